"""What every bench shares: its typed settings with the quick or full values filled in, timing, the rows with their
notes, the JSON file and the printed table.

Conventions (see docs/benchmarks.md): contenders are measured side by side in one
process with the same threads; times are medians of repeats after warm-up; ratios to the
reference are the result, absolute seconds are context.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

from peftkit.config.base import BenchSettings
from peftkit.utils.output_paths import write_result_json
from peftkit.utils.tables import format_table, machine_info

S = TypeVar("S", bound=BenchSettings)


def with_defaults(settings: S, *layers: dict) -> S:
    """``settings`` with every field the user left unset (or set to None) taken from the first layer that names it
    (the quick or full values, then the bench's own defaults), validated again: the one typed object a bench's run
    reads, instead of a dict of settings."""
    values = {k: v for k, v in settings.given().items() if v is not None}
    for layer in layers:
        for key, value in layer.items():
            values.setdefault(key, value)
    return type(settings).model_validate(values)


class BenchRows(list):
    """Rows plus top-level JSON fields (``extra``, e.g. notes) that write_bench adds to the file."""

    def __init__(self, rows=(), extra: dict | None = None):
        super().__init__(rows)
        self.extra = extra or {}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_step(method, model, lr: float = 1e-5):
    """The trainer's own optimizer step (loss, backward, clipping, AdamW, schedule, the method's hook) on a batch it
    is handed: what a run does per step, so a bench times exactly that."""
    from peftkit.config.schema import TrainArgs
    from peftkit.train.trainer import Trainer

    options = TrainArgs(lr=lr, weight_decay=0.01, warmup_ratio=0.0, schedule="constant", max_steps=2**31 - 1)
    trainer = Trainer.stepper(model, method, options)
    return lambda batch: trainer.optimizer_step([batch])


def time_interleaved(contenders: dict, repeats: int, warmup: int, sync) -> dict:
    """Median seconds per contender; each round runs every contender once, the order rotating by round."""
    names = list(contenders)
    times = {n: [] for n in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            contenders[name]()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def write_bench(name: str, rows: list[dict], json_path: str | Path | None, extra: dict | None = None) -> dict:
    """Print the table and write {"bench", "machine", "command", "rows", ...} to ``json_path`` atomically (never
    over a file peftkit did not write)."""
    payload = {"bench": name, "machine": machine_info(), "command": " ".join(["peftkit", *sys.argv[1:]]), "rows": rows}
    extra = {**getattr(rows, "extra", {}), **(extra or {})}  # a bench may return a list with .extra (e.g. notes)
    if extra:
        payload.update(extra)
    print(format_table(rows))
    if json_path:
        path = write_result_json(json_path, payload, "--json")
        print(f"wrote {path}")
    return payload
