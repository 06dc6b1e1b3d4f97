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


class Clocks:
    """Wall and process CPU seconds of the block it wraps (``with Clocks() as spent: ...; spent.wall, spent.cpu``).
    CPU seconds are every thread of this process together, so cpu / wall is about the cores a step kept busy: a
    contender that is slower on the wall clock but uses fewer cores shows it here."""

    wall = cpu = 0.0

    def __enter__(self) -> "Clocks":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu

    @classmethod
    def summed(cls, spans) -> "Clocks":
        """One span holding the wall and CPU seconds of ``spans`` together."""
        total = cls()
        total.wall, total.cpu = sum(c.wall for c in spans), sum(c.cpu for c in spans)
        return total


def cpu_timed(fn: Callable[[], object], spans: list) -> Callable[[], object]:
    """``fn`` that appends the process CPU seconds of each of its calls to ``spans`` (beside a wall-clock timer such
    as time_interleaved, which calls it once per round, warm-up rounds first)."""
    def timed():
        with Clocks() as spent:
            result = fn()
        spans.append(spent.cpu)
        return result

    return timed


def count_step_flops(method, model, batch: dict) -> int:
    """FLOPs of one training forward + backward of ``model`` on ``batch`` as torch.utils.flop_counter counts them:
    2·m·n·k for each matmul (and attention where the kernel has a formula); elementwise work and the optimizer are
    not counted (the usual MFU convention). Gradients are cleared afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter:
            method.compute_loss(model, batch).backward()
    finally:
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def mfu(flops: float | None, seconds: float | None, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops`` of the work done in ``seconds`` of wall time over the machine's measured
    matmul FLOP/s (peftkit.utils.env.matmul_peak_flops); None where any of the three is missing."""
    if not flops or not seconds or not peak_flops:
        return None
    return flops / seconds / peak_flops


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
