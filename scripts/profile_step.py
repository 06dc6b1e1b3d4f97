"""Where a training step's time goes: torch.profiler over the trainer's own optimizer step, ops grouped.

    python scripts/profile_step.py --methods full,lora --batch 32 --seq 128 --json docs/results/step-profile.json

For each method (minilm-l6, fp32 or --precision bf16, the trainer's step: forward, backward, clipping, AdamW, schedule) the rows give
the share of the step's CPU time per op group (dropout masks, matmuls, attention, elementwise, normalisation,
optimizer, the rest), the group's FLOPs where the profiler counts them, and its FLOP/s over the measured matmul peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUPS = (
    ("dropout masks", ("bernoulli", "dropout")),  # drawing the random masks: the CPU's RNG, not arithmetic
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention", ("scaled_dot_product", "aten::_softmax", "aten::softmax", "_attention")),
    ("optimizer", ("adam", "_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt", "Optimizer")),
    ("normalisation", ("layer_norm", "native_layer_norm")),
    ("elementwise", ("aten::add", "aten::mul", "aten::gelu", "aten::tanh", "aten::div", "aten::sub",
                     "aten::copy_", "aten::fill_", "aten::zero_", "aten::clone", "aten::cat", "aten::where")),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, markers in GROUPS:
        if any(marker.lower() in lowered for marker in markers):
            return group
    return "other"


def stepper(method, model, precision: str):
    """The trainer's optimizer step (loss, backward, clipping, AdamW, schedule, the method's hook) in ``precision``."""
    from peftkit.config.schema import TrainArgs
    from peftkit.train.trainer import Trainer

    options = TrainArgs(lr=1e-5, weight_decay=0.01, warmup_ratio=0.0, schedule="constant", max_steps=2**31 - 1,
                        precision=precision)
    trainer = Trainer.stepper(model, method, options)
    return lambda batch: trainer.optimizer_step([batch])


def main() -> None:
    import copy

    import torch

    from peftkit.bench.costs import build_model, make_batch, prepare
    from peftkit.utils.env import matmul_kind, matmul_peak_flops
    from peftkit.utils.tables import machine_info

    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="train.precision of the profiled step (bf16: autocast; its peak is the bf16 matmul's)")
    parser.add_argument("--top", type=int, default=0, help="also print the N ops with the most self CPU time")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_peak_flops(args.precision)
    base = build_model({"model": "minilm-l6", "seed": 0})
    batch = make_batch(base.config.vocab_size, args.batch, args.seq)
    rows = []
    for name in args.methods.split(","):
        method, model = prepare(name, copy.deepcopy(base))
        model.train()
        step = stepper(method, model, args.precision)
        step(batch)  # warm-up: optimizer state allocated, kernels chosen
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
            step(batch)
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            print(f"{name:8s} {e.self_cpu_time_total / 1e3:9.1f} ms  {e.count:6d} calls  {e.key}")
        total_us = sum(e.self_cpu_time_total for e in events)
        totals: dict[str, list[float]] = {}
        for e in events:
            entry = totals.setdefault(group_of(e.key), [0.0, 0.0])
            entry[0] += e.self_cpu_time_total
            entry[1] += e.flops or 0
        for group, (us, flops) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
            rows.append({"method": name, "group": group, "share_of_step": us / total_us, "seconds": us / 1e6,
                         "flops": flops or None,
                         "fraction_of_matmul_peak": (flops / (us / 1e6) / peak) if flops and us else None})
        rows.append({"method": name, "group": "whole step", "share_of_step": 1.0, "seconds": total_us / 1e6,
                     "flops": sum(f for _, f in totals.values()) or None,
                     "fraction_of_matmul_peak": sum(f for _, f in totals.values()) / (total_us / 1e6) / peak})
    payload = {"bench": "step-profile", "machine": {**machine_info(), "matmul_kind": matmul_kind(),
                                                    "matmul_peak_flops": peak, "precision": args.precision},
               "command": " ".join(["python", "scripts/profile_step.py", *sys.argv[1:]]), "rows": rows}
    Path(args.json).write_text(json.dumps(payload, indent=2))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
