"""Run by tests/train/test_fsdp_methods.py: train each named method a few steps through the Trainer, under torchrun
with train.strategy=fsdp (2 processes) or as one plain process, on the same global batches, and write what the test
compares: the global loss of every step, the gathered method state at the end, the bytes each process holds.

Under torchrun it also checks, for each method, in the worker itself:
* resume: a fresh model resumed from the step-2 checkpoint ends bit-identical to the uninterrupted run;
* final/: the whole model state gathered as the run pipeline gathers it loads into a fresh plain model whose method
  state equals the gathered method state bit for bit.

usage: fsdp_methods_worker.py OUT QUANT_DIR METHOD[,METHOD...]
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.tiny import tiny_bert  # noqa: E402

from peftkit.config.schema import TrainArgs  # noqa: E402
from peftkit.methods import create_method  # noqa: E402
from peftkit.train.distributed import full_tensors, init_distributed, local_bytes, shutdown  # noqa: E402
from peftkit.train.trainer import Trainer  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 4
RESUME_AT = 2
# label -> (method name, method options, train options beyond the shared ones)
CASES = {
    "lora": ("lora", {"r": 4}, {}),
    "pafi": ("pafi", {"rho": 0.02}, {}),
    "hiwi": ("hiwi", {"r": 4}, {}),
    "bitfit": ("bitfit", {}, {}),
    "supertuning": ("supertuning", {"rho": 0.02}, {}),
    "meft1": ("meft1", {"r": 4}, {}),
    "apiq": ("apiq", {}, {}),
    "lora-bf16-offload": ("lora", {"r": 4}, {"fsdp_mixed_precision": "bf16", "fsdp_cpu_offload": True}),
    "apiq-bf16": ("apiq", {}, {"fsdp_mixed_precision": "bf16"}),
}


def build(label: str, quant_dir: Path):
    """(model with the method applied, method); the same weights in every process (seeded)."""
    name, options, _ = CASES[label]
    method = create_method(name, options)
    torch.manual_seed(0)
    if name == "apiq":
        base = method.load_base(SimpleNamespace(name=str(quant_dir), dtype="float32"), "causal_lm", None, None)
    else:  # no dropout: one process and two draw different masks for the same rows
        base = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    model = method.prepare(base)
    if method.checkpoints_by_default:  # apiq: gradient checkpointing on, as the run pipeline sets it
        method.enable_gradient_checkpointing(model)
    return model, method


def global_batch(label: str, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    if CASES[label][0] == "apiq":
        ids = torch.randint(0, 128, (GLOBAL_BATCH, 16), generator=g)
        return {"input_ids": ids, "labels": ids}
    ids = torch.randint(5, 64, (GLOBAL_BATCH, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)}


def make_trainer(label, model, method, dist, run_dir):
    per_process = GLOBAL_BATCH // dist.world_size
    options = TrainArgs(max_steps=STEPS, batch_size=per_process, lr=2e-3, warmup_ratio=0.0, weight_decay=0.01,
                        strategy="fsdp", log_every=1, **CASES[label][2])
    return Trainer(model, method, options, run_dir, [{}] * dist.world_size, lambda rows: rows[0], dist=dist,
                   log=lambda msg: None)


def take_steps(trainer, label, dist, steps) -> list[float]:
    """Optimizer steps on this process's rows of each global batch; the global mean loss of each step."""
    losses = []
    for step in steps:
        batch = global_batch(label, step)
        rows = slice(dist.rank * trainer.opt.batch_size, (dist.rank + 1) * trainer.opt.batch_size)
        loss, _ = trainer.optimizer_step([{k: v[rows] for k, v in batch.items()}])
        trainer.step = step
        trainer.method.training_note(trainer.raw_model, step)  # as train() calls it: HiWi counts its dead units
        total = torch.tensor([loss], dtype=torch.float64)
        if dist.enabled:
            torch.distributed.all_reduce(total)
        losses.append(float(total) / dist.world_size)
        if step == RESUME_AT:
            trainer.save_checkpoint()
    return losses


def reload_after_evaluation(trainer, label: str, run_dir: Path) -> bool:
    """What train.select_best does at the end of a run: an evaluation forward (which leaves the root unit gathered),
    then an earlier checkpoint's method state loaded; the model must then hold exactly that state."""
    from peftkit.train import checkpoint as ckpt

    trainer.raw_model.eval()
    with torch.no_grad():
        trainer.raw_model(**global_batch(label, 0))
    trainer.raw_model.train()
    tensors, _, _ = ckpt.read_checkpoint(run_dir / "checkpoints" / f"step-{RESUME_AT:06d}", ())
    trainer._load_state(tensors, None)
    with torch.no_grad():  # the forward the final evaluation runs, then what final/ gathers
        trainer.raw_model(**global_batch(label, 0))
    trainer.full_model_state()
    now = full_tensors(trainer.method.trainable_state(trainer.raw_model))
    return now.keys() == tensors.keys() and all(torch.equal(now[k].cpu(), tensors[k]) for k in tensors)


def record_packed_dtypes(seen: set):
    """Record the dtype of the scales every packed Linear computes with (what FSDP gathered for it)."""
    from peftkit.quant.packed_linear import PackedLinear

    unpack_t = PackedLinear.unpack_t

    def recording(self, dtype=torch.float32):
        seen.add(str(self.scales.dtype))
        return unpack_t(self, dtype)

    PackedLinear.unpack_t = recording


def run(label: str, out: Path, quant_dir: Path, dist) -> None:
    tag = f"{label}-w{dist.world_size}"
    packed_dtypes = set()
    if CASES[label][0] == "apiq":
        record_packed_dtypes(packed_dtypes)
    model, method = build(label, quant_dir)
    trainer = make_trainer(label, model, method, dist, out / tag)
    held, whole = local_bytes(trainer.raw_model)
    losses = take_steps(trainer, label, dist, range(1, STEPS + 1))
    state = {k: v.detach().cpu().contiguous() for k, v in trainer._trainable_state().items()}
    result = {"losses": losses, "held_bytes": held, "whole_bytes": whole, "packed_dtypes": sorted(packed_dtypes),
              "dtypes": sorted({str(p.dtype) for p in trainer.raw_model.parameters() if p.requires_grad})}
    if dist.enabled:
        full = trainer.full_model_state()  # what the run pipeline gathers for final/
        if dist.is_main:
            fresh, fresh_method = build(label, quant_dir)
            fresh.load_state_dict(full)
            rebuilt = fresh_method.trainable_state(fresh)
            result["final_equal"] = rebuilt.keys() == state.keys() and all(
                torch.equal(rebuilt[k].cpu(), state[k]) for k in state)
        result["reload_equal"] = reload_after_evaluation(trainer, label, out / tag)
        model, method = build(label, quant_dir)
        resumed = make_trainer(label, model, method, dist, out / tag)
        resumed.resume_from(out / tag / "checkpoints" / f"step-{RESUME_AT:06d}")
        result["resumed_losses"] = take_steps(resumed, label, dist, range(RESUME_AT + 1, STEPS + 1))
        again = resumed._trainable_state()
        result["resume_equal"] = again.keys() == state.keys() and all(
            torch.equal(again[k].cpu(), state[k]) for k in state)
    if dist.enabled:
        result["held_bytes_by_rank"] = [None] * dist.world_size
        torch.distributed.all_gather_object(result["held_bytes_by_rank"], held)
    if dist.is_main:
        save_file(state, str(out / f"{tag}.safetensors"))
        (out / f"{tag}.json").write_text(json.dumps(result))


def main(out: Path, quant_dir: Path, labels: list[str]) -> None:
    torch.set_num_threads(1)
    dist = init_distributed()
    # a group smaller than torchrun launched would compare one process with one process and prove nothing
    assert dist.world_size == int(os.environ.get("WORLD_SIZE", "1")), "the worker is not in torchrun's process group"
    for label in labels:
        run(label, out, quant_dir, dist)
    shutdown(dist)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(","))
