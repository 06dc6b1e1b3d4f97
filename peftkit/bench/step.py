"""The training step at the machine's limit: full fine-tuning of minilm-l6 in fp32 and in bf16, and what
``train.precision: auto`` picks here.

One process, one model per precision, the trainer's own optimizer step (``Trainer.stepper``: loss, backward,
clipping, fused AdamW, schedule) on one fixed batch of ``batch`` x ``seq`` random token ids (every position
attended), the two precisions alternating step by step after ``warmup`` untimed steps each; medians of
``repeats``. Rows:

* one per precision: median wall and process CPU seconds per step, the step's FLOPs, the dtype's one-size matmul
  peak measured in this process with the same threads (peftkit.utils.env.matmul_peak_flops: the best of five
  1024^2 matmuls in that dtype) and MFU = step FLOPs / median step wall / that peak (``mfu_cpu``: step FLOPs /
  median step CPU seconds / the peak timed by CPU seconds: on a machine shared with other work the wall clock also
  counts the time the process waited for a core, the CPU clock only what it computed);
* ``bf16 / fp32 step speed``: fp32 step wall over bf16 step wall (``speedup_cpu``: over CPU seconds), beside the
  matmul peaks' own ratio (by CPU seconds) and the
  target it is held to (3x where the CPU has AMX, 2x where a bf16 matmul is at least 2.3x an fp32 one, else none);
* ``precision auto``: what ``train.precision: auto`` resolves to for this model and batch, and why.

FLOPs of one step (counted by torch.utils.flop_counter, 2 FLOPs per multiply-add, matmuls and attention only; the
formula below gives the same figure for a BERT-style encoder and is reported beside the count):

    F = 3 x [ 2 T L (4 h^2 + 2 h i)  +  4 b s^2 h L  +  2 b h^2 + 2 b h c ]

with T = b s tokens, L layers, hidden h, intermediate i, c labels: per layer the four h x h projections (query,
key, value, output) and the two feed-forward matmuls on every token, and the two attention matmuls (scores and
weighted values, b s^2 h multiply-adds each); then the pooler and the classifier on the first token. The backward
costs twice the forward (gradients of inputs and of weights; the embeddings' input needs none, but the first
layer's input does, since the embeddings train). Elementwise work (GELU, LayerNorm, dropout, softmax) and AdamW
are not counted: MFU says how close the step comes to doing nothing but its matmuls at the matmul's own speed.

options (all optional): model, batch, seq, repeats, warmup, threads, method.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Optional

from peftkit.bench.harness import BenchRows, count_step_flops
from peftkit.config.base import BenchSettings, option
from peftkit.config.schema import like_train
from peftkit.utils.registry import BENCHES

QUICK = dict(repeats=3, warmup=1, seq=64)
FULL = dict(repeats=7, warmup=2, seq=128)
DEFAULTS = dict(model="minilm-l6", method="full", batch=32, threads=1, seed=0)
PRECISIONS = ("fp32", "bf16")
MFU_TARGET = {"fp32": 0.6, "bf16": 0.4}


def settings(quick: bool, options: dict) -> dict:
    s = {**DEFAULTS, **(QUICK if quick else FULL)}
    s.update({k: v for k, v in (options or {}).items() if v is not None})
    return s


def formula_flops(config, batch: int, seq: int) -> int:
    """The module docstring's F for a BERT-style encoder config (hidden_size, intermediate_size, num_hidden_layers,
    num_labels)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens, labels = batch * seq, getattr(config, "num_labels", 2)
    forward = 2 * tokens * layers * (4 * h * h + 2 * h * i) + 4 * batch * seq * seq * h * layers \
        + 2 * batch * h * h + 2 * batch * h * labels
    return 3 * forward


def speedup_target(matmul_kind: str, matmul_ratio: float) -> float | None:
    """The bf16 / fp32 step speed a machine is held to: 3 with AMX, 2 where a bf16 matmul is >= 2.3x fp32, else None."""
    if matmul_kind == "cpu-amx-bf16":
        return 3.0
    return 2.0 if matmul_ratio >= 2.3 else None


def make_stepper(base, s: dict, precision: str):
    """(model, one optimizer step of the trainer on a batch it is handed) for ``precision``."""
    from peftkit.bench.costs import prepare
    from peftkit.config.schema import TrainArgs
    from peftkit.train.trainer import Trainer

    method, model = prepare(s["method"], copy.deepcopy(base))
    model.train()
    options = TrainArgs(lr=1e-5, weight_decay=0.01, warmup_ratio=0.0, schedule="constant", max_steps=2**31 - 1,
                        precision=precision, batch_size=s["batch"])
    trainer = Trainer.stepper(model, method, options)
    return method, model, (lambda batch: trainer.optimizer_step([batch]))


def run(quick: bool, options: dict) -> list[dict]:
    import torch

    from peftkit.bench.costs import build_model, make_batch
    from peftkit.train.trainer import matmul_shapes
    from peftkit.config.schema import TrainArgs
    from peftkit.utils.env import cpu_model, matmul_kind, matmul_peak_flops, resolve_precision

    s = settings(quick, options)
    torch.set_num_threads(int(s["threads"]))
    base = build_model({"model": s["model"], "seed": s["seed"]})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = {k: v.to(device) for k, v in make_batch(base.config.vocab_size, s["batch"], s["seq"], seed=s["seed"]).items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # a step's kernels may still run
    steppers, flops = {}, {}
    for precision in PRECISIONS:
        method, model, step = make_stepper(base, s, precision)
        flops[precision] = count_step_flops(method, model, batch)
        steppers[precision] = step
    walls, cpus = {p: [] for p in PRECISIONS}, {p: [] for p in PRECISIONS}
    for round_ in range(s["warmup"] + s["repeats"]):  # alternate, rotating who goes first
        for precision in (PRECISIONS if round_ % 2 == 0 else PRECISIONS[::-1]):
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            steppers[precision](batch)
            sync()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"[step] round {round_} {precision}: {wall:.3f} s ({cpu:.3f} s CPU)", flush=True)
            if round_ >= s["warmup"]:
                walls[precision].append(wall)
                cpus[precision].append(cpu)
    peaks = {p: matmul_peak_flops(p) for p in PRECISIONS}
    cpu_peaks = {p: matmul_peak_flops(p, clock="cpu") for p in PRECISIONS}
    formula = formula_flops(base.config, s["batch"], s["seq"])
    rows = []
    for precision in PRECISIONS:
        wall, cpu = statistics.median(walls[precision]), statistics.median(cpus[precision])
        rows.append({"row": f"{s['method']} step, {precision}", "precision": precision, "step_seconds": wall,
                     "step_cpu_seconds": cpu, "step_flops": flops[precision], "formula_flops": formula,
                     "matmul_peak_flops": peaks[precision], "mfu": flops[precision] / wall / peaks[precision],
                     "matmul_peak_flops_cpu": cpu_peaks[precision],
                     "mfu_cpu": flops[precision] / cpu / cpu_peaks[precision], "target": MFU_TARGET[precision],
                     "met": flops[precision] / wall / peaks[precision] >= MFU_TARGET[precision]})
    kind = matmul_kind()
    speed = statistics.median(walls["fp32"]) / statistics.median(walls["bf16"])
    speed_cpu = statistics.median(cpus["fp32"]) / statistics.median(cpus["bf16"])
    matmul_ratio = cpu_peaks["bf16"] / cpu_peaks["fp32"]  # the CPU clock: what the cores do, not who else ran
    target = speedup_target(kind, matmul_ratio)
    rows.append({"row": "bf16 / fp32 step speed", "precision": "bf16 vs fp32", "speedup": speed,
                 "speedup_cpu": speed_cpu, "matmul_peak_ratio": matmul_ratio, "target": target,
                 "met": None if target is None else speed >= target})
    options_auto = TrainArgs(precision="auto", batch_size=s["batch"])
    dataset = [{"input_ids": row} for row in batch["input_ids"].cpu().tolist()]
    picked, why = resolve_precision("auto", matmul_shapes(base, options_auto, dataset))
    rows.append({"row": "precision auto", "precision": picked, "why": why})
    notes = [f"{s['model']}, method {s['method']}, batch {s['batch']} x {s['seq']} random tokens, "
             f"{torch.get_num_threads()} torch thread(s), medians of {s['repeats']} alternating steps after "
             f"{s['warmup']} warm-up step(s) each.",
             "MFU = counted step FLOPs / median step wall seconds / the precision's measured 1024^2 matmul FLOP/s "
             "(same process, same threads); mfu_cpu uses CPU seconds instead of wall seconds."]
    return BenchRows(rows, {"notes": notes, "settings": s, "cpu_model": cpu_model(), "matmul_kind": kind,
                            "matmul_peak_flops": peaks, "matmul_peak_flops_cpu": cpu_peaks})


class StepSettings(BenchSettings):
    model: Optional[str] = option(None, "Model alias or directory (default minilm-l6).", min_length=1)
    method: Optional[str] = option(None, "Method whose step is timed (full).", min_length=1)
    batch: like_train("batch_size") = option(None, "Rows per step (32).")
    seq: Optional[int] = option(None, "Tokens per row (quick 64, full 128).", ge=2, le=1_048_576)
    repeats: Optional[int] = option(None, "Timed steps per precision (quick 3, full 7).", ge=1, le=10_000)
    warmup: Optional[int] = option(None, "Untimed steps per precision first (quick 1, full 2).", ge=0, le=1000)
    threads: like_train("threads") = option(None, "torch threads (1).")
    seed: like_train("seed") = option(None, "Seed of the model head and the batch (0).")


@BENCHES.register("step", help="The training step in fp32 and bf16: speed ratio, MFU at each dtype's matmul peak, "
                               "what precision auto picks.")
class StepBench:
    Settings = StepSettings
    run = staticmethod(run)
