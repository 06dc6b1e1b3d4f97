"""Run by tests/train/test_precision_auto.py under torchrun: each process times bf16 differently (rank 0 fast, rank 1
slow); every process must still train in the one precision the main process picked. Writes rank<N>.txt."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.tiny import tiny_bert  # noqa: E402

from peftkit.config.schema import TrainArgs  # noqa: E402
from peftkit.methods import create_method  # noqa: E402
from peftkit.train.distributed import init_distributed  # noqa: E402
from peftkit.train.trainer import Trainer  # noqa: E402
from peftkit.utils import env  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist = init_distributed()
    os.environ["PEFTKIT_CACHE"] = str(out / f"cache{dist.rank}")
    bf16_seconds = 0.01 if dist.rank == 0 else 1.0
    env.matmul_seconds = lambda dtype_name, rows, hidden, inter, repeats=3: 0.03 if dtype_name == "fp32" else bf16_seconds
    env.cpu_bf16_failure = lambda: None
    method = create_method("lora", r=4)
    rows = [{"input_ids": list(range(8)), "labels": 0} for _ in range(8)]
    trainer = Trainer(method.prepare(tiny_bert()), method, TrainArgs(precision="auto", batch_size=4), out / "run",
                      rows, lambda batch: batch, dist=dist, log=lambda msg: None)
    # this process's own timing says bf16 on rank 0 and fp32 on rank 1; the test compares what each trained in
    assert trainer.precision in ("fp32", "bf16"), trainer.precision
    (out / f"rank{dist.rank}.txt").write_text(trainer.precision)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
