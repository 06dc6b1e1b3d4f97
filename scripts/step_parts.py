"""The training step in parts, by the CPU clock: forward, backward, clipping, AdamW + schedule, zero_grad, in fp32
and bf16, with the model's dropout as it is, without attention-probability dropout, and without any dropout.

    python scripts/step_parts.py --method full --batch 32 --seq 128 --steps 5 --json docs/results/step-parts.json

Without the profiler (whose bookkeeping lengthens steps of many small ops): each part is timed by the process's CPU
seconds (one thread: what the core computed, however busy the machine) around the same calls the trainer makes
(method.compute_loss under autocast, backward, clip_grad_norm_ at 1.0, fused AdamW, the schedule, zero_grad with
set_to_none); the variants alternate step by step after one warm-up step each; medians. ``trainer_share`` = the parts
the training loop owns (clipping, optimizer, zero_grad) over the whole step: the most any change to the loop can
save. The dropout variants say what the model's dropout costs (they train a different model: evidence, not an
option).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PARTS = ("forward", "backward", "clip", "optimizer", "zero_grad")
DROPOUT = {"as is": None, "no attention dropout": "attention", "no dropout": "all"}


def without_dropout(model, which: str | None) -> None:
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and (which == "all" or (which == "attention" and
                                                                         name.endswith("attention.self.dropout"))):
            module.p = 0.0


def part_stepper(base, method_name: str, precision: str, dropout: str | None):
    import torch

    from peftkit.bench.costs import prepare
    from peftkit.train.trainer import make_optimizer
    from peftkit.config.schema import TrainArgs

    method, model = prepare(method_name, copy.deepcopy(base))
    model.train()
    without_dropout(model, dropout)
    options = TrainArgs(lr=1e-5, weight_decay=0.01)
    optimizer = make_optimizer(options, method.param_groups(model, options.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step(batch) -> dict:
        seconds = {}
        clock = time.process_time()

        def lap(name):
            nonlocal clock
            now = time.process_time()
            seconds[name], clock = now - clock, now

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss = method.compute_loss(model, batch)
        lap("forward")
        loss.backward()
        lap("backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lap("clip")
        optimizer.step()
        scheduler.step()
        lap("optimizer")
        optimizer.zero_grad(set_to_none=True)
        lap("zero_grad")
        return seconds

    return step


def main() -> None:
    import torch

    from peftkit.bench.costs import build_model, make_batch
    from peftkit.utils.env import cpu_model, matmul_kind
    from peftkit.utils.tables import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="full")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = build_model({"model": "minilm-l6", "seed": 0})
    batch = make_batch(base.config.vocab_size, args.batch, args.seq)
    variants = {(p, d): part_stepper(base, args.method, p, DROPOUT[d]) for p in ("fp32", "bf16") for d in DROPOUT}
    spent = {v: [] for v in variants}
    names = list(variants)
    for round_ in range(1 + args.steps):
        for v in (names if round_ % 2 == 0 else names[::-1]):
            seconds = variants[v](batch)
            if round_:
                spent[v].append(seconds)
    rows = []
    for (precision, dropout), steps in spent.items():
        parts = {part: statistics.median(s[part] for s in steps) for part in PARTS}
        whole = statistics.median(sum(s.values()) for s in steps)
        rows.append({"method": args.method, "precision": precision, "dropout": dropout,
                     **{f"{part}_cpu_seconds": parts[part] for part in PARTS}, "step_cpu_seconds": whole,
                     "trainer_share": (parts["clip"] + parts["optimizer"] + parts["zero_grad"]) / whole})
    payload = {"bench": "step-parts", "machine": {**machine_info(), "cpu_model": cpu_model(),
                                                  "matmul_kind": matmul_kind()},
               "command": " ".join(["python", "scripts/step_parts.py", *sys.argv[1:]]),
               "notes": [f"minilm-l6, {args.method}, batch {args.batch} x {args.seq} random tokens, {args.threads} "
                         f"thread(s), medians of {args.steps} alternating steps after one warm-up step, CPU seconds."],
               "rows": rows}
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    for row in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))


if __name__ == "__main__":
    main()
