"""Run by tests/train/test_distributed.py under torchrun: train a few steps, save this rank's weights."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.tiny import tiny_bert, tiny_bert_tokenizer, write_glue_task  # noqa: E402

from peftkit.config.schema import TrainArgs  # noqa: E402
from peftkit.methods import create_method  # noqa: E402
from peftkit.tasks.glue import PadCollator, get_task, load_rows, tokenize_rows  # noqa: E402
from peftkit.train.distributed import init_distributed  # noqa: E402
from peftkit.train.trainer import Trainer  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist = init_distributed()
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
    model = tiny_bert()
    method = create_method("lora", r=4)
    model = method.prepare(model)
    tok = tiny_bert_tokenizer(out / f"tok{dist.rank}")
    write_glue_task(out / f"glue{dist.rank}", "sst2", 40, 8)
    task = get_task("sst2")
    data = tokenize_rows(task, load_rows("sst2", "train", str(out / f"glue{dist.rank}")), tok, 16)
    options = TrainArgs(max_steps=5, batch_size=4, lr=1e-2, save_every=100, log_every=1)
    torch.manual_seed(1000 + dist.rank)  # different dropout per rank, as in real DDP
    trainer = Trainer(model, method, options, out / "run", data, PadCollator(0, False), dist=dist)
    trainer.train()
    state = {k: v.contiguous() for k, v in method.trainable_state(trainer.raw_model).items()}
    # LoRA's B starts at zero: if it is still zero, this replica did not train and the comparison would be empty
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k), f"rank {dist.rank} did not train"
    save_file(state, str(out / f"rank{dist.rank}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
