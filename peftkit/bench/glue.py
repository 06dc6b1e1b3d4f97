"""Every method on GLUE with its costs: one row per (method, task).

Per row (docs/benchmarks.md):
  metric, value     the task's headline GLUE metric on the validation split after fine-tuning with the recipe
                    configs/glue/<method>-minilm-<task>.yaml (methods without a recipe of their own, e.g. bitfit and
                    supertuning, take the LoRA recipe's data/train sections with their own default options);
  trainable_pct     parameters that train / all parameters (from the run's metrics.json);
  stored_bytes      bytes of the saved model in <run>/final/ without tokenizer files and peftkit.json: what a
                    user keeps per task (the whole model for full fine-tuning, the adapter otherwise);
  saved_bytes       bytes autograd keeps between forward and backward in one training forward on a fixed batch
                    of real training rows (bench.costs.saved_tensor_bytes: storages deduplicated, parameters and
                    buffers excluded);
  peak_rss_bytes    what training steps add to the peak RSS of a FRESH interpreter, over its own peak after
                    loading the model + optimizer state and one no-grad forward (bench.costs; random tokens,
                    same batch shape);
  step_seconds      median seconds of forward + backward + AdamW step on that batch, contenders alternating;
  latency_ratio     median inference forward of the method's model (merged where the method can merge) over the
                    unmodified base model in the same run (interleaved rounds, bench.harness.time_interleaved).
With two or more tasks, each row label that ran them all with the same seeds also gets a row of task ``average``:
the mean of its tasks' headline values (with several seeds, the std of the per-seed averages).
The costs are per row (measured on the first task's batch) and repeated on each of its task rows.
A row is a recipe stem: ``pafi-r0.001`` runs configs/glue/pafi-r0.001-minilm-<task>.yaml (its method section says which
method and options), so one method can appear at several settings. ``stem@key=value,...`` overrides train keys of
the stem's recipe: ``pafi@lr=3e-3`` is the PaFi recipe at learning rate 3e-3.
A learning-rate search (option ``lr_search``: row -> learning rates) replaces each named row by one row per rate
(``row@lr=...``) and adds a selected row per (row, task): the rate whose value (the mean over seeds) is best on the
validation split, with ``lr`` and ``lr_grid`` (rate -> value) beside it. Selection and score use the same validation
split (GLUE's test labels are not public): every searched row gets the same advantage, so give each the same number
of rates. With ``search_seeds`` (a part of ``seeds``) the search runs those seeds only, and the selected rate then
runs the other seeds: the rate is chosen on the search seeds' mean, the selected row reports every seed.
Several seeds (option ``seeds``) run the tasks in ``seed_tasks`` (the small ones: mrpc, stsb, rte) once per seed;
``value`` is then the mean, ``value_std`` the sample standard deviation, ``values`` the single runs.
``jobs`` > 1 runs the fine-tunes as that many parallel `peftkit finetune` processes (a GPU fits many small ones);
``finetune: false`` measures the costs and collects rows from run dirs an earlier run of the same grid left;
``finetune: missing`` runs only the fine-tunes whose run dir has no metrics.json yet; ``costs: false`` skips the
saved-bytes / step-time / latency measurements (their columns are then None).
On a CUDA machine models train and are measured there in fp32, and rows add peak_cuda_bytes (the fresh process's
peak allocated GPU bytes over a few training steps, minus what was allocated before them).
The full variant runs every recipe as written (hours on CPU); --quick caps steps, rows and sequence length.
This module holds the settings and the run; the grid (rows, recipes, seeds, the search, the fine-tunes) is
bench/grid.py, the cost columns are measured by bench/costs.py, and bench/harness.py fills in the settings.

options (all optional): methods (list of rows), lr_search (row -> list of learning rates), tasks (list), model,
work_dir, data_root, max_steps, limit,
eval_limit, max_length, batch_size, step_repeats, latency_repeats, latency_batch, rss (bool), rss_steps, seed,
seeds (list), search_seeds (list), seed_tasks (list), jobs, finetune (true | false | missing), costs (bool), threads,
report (bool: also write <work_dir>/report/ with the PNG plots and report.md, as `peftkit report` does).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, StrictBool, model_validator

from peftkit.bench import costs
from peftkit.bench.grid import (
    DEFAULT_ROWS,
    average_rows,
    collect_results,
    method_section,
    methods_to_run,
    more_seeds_of_the_best_rates,
    planned_runs,
    recipe_for,
    run_finetunes,
    selected_rows,
    split_row,
)
from peftkit.bench.harness import BenchRows, torch_threads, with_defaults
from peftkit.config.base import BenchSettings, option
from peftkit.config.schema import like_train
from peftkit.paths import glue_root
from peftkit.utils.registry import BENCHES

COLUMNS = ("method", "task", "metric", "value", "trainable_pct", "stored_bytes", "saved_bytes", "peak_rss_bytes",
           "step_seconds", "latency_ratio")  # the table's columns: always present, None where not measured
QUICK = dict(tasks=["sst2", "mrpc"], max_steps=20, limit=320, eval_limit=128, max_length=64, step_repeats=5,
             latency_repeats=20, rss_steps=1)
FULL = dict(tasks=["sst2", "mrpc", "stsb", "rte"], max_steps=None, limit=None, eval_limit=None, max_length=None,
            step_repeats=5, latency_repeats=20, rss_steps=3)
DEFAULTS = dict(methods=None, lr_search=None, search_seeds=None, model="minilm-l6", work_dir=None, data_root=None, batch_size=16, latency_batch=8,
                rss=True, seed=42, seeds=None, seed_tasks=["mrpc", "stsb", "rte"], jobs=1, finetune=True, costs=True, threads=None,
                report=True)


def settings(quick: bool, options: dict | GlueSettings | None) -> GlueSettings:
    """The bench's typed settings: what the user gave (``--set``), the rest from the quick or full values, then the
    defaults."""
    if not isinstance(options, GlueSettings):
        options = GlueSettings.model_validate({k: v for k, v in (options or {}).items() if v is not None})
    return with_defaults(options, QUICK if quick else FULL, DEFAULTS)


def peak_memory(rows: list[str], s: GlueSettings) -> dict:
    """row -> {"peak_rss_bytes", "peak_cuda_bytes"} from a fresh interpreter per row (bench.costs), each preparing
    the method section of the row's recipe on the first task."""
    spec = {"model": s.model, "batch": s.batch_size, "seq": s.max_length or 128, "seed": 0,
            "steps": s.rss_steps, "threads": s.threads or torch_threads(), "device": str(costs.bench_device())}
    return costs.fresh_process_peaks({row: method_section(row, s.tasks[0], s) for row in rows}, spec)


def run(quick: bool, options: dict) -> list[dict]:
    import torch

    from peftkit.models.load import load_model
    from peftkit.tasks.glue import get_task

    s = settings(quick, options)
    if not s.data_root:
        s = s.model_copy(update={"data_root": glue_root()})
    if s.threads:  # e.g. 1 on a shared machine: oversubscribed thread pools slow every contender
        torch.set_num_threads(int(s.threads))
    work = Path(s.work_dir or f"runs/bench-glue{'-quick' if quick else ''}")
    methods = methods_to_run(s)
    started = time.perf_counter()
    print(f"[glue] methods {methods} x tasks {s.tasks} on {s.model}, work dir {work}", flush=True)

    # costs do not depend on a row's train overrides (they use the bench's own batch): measured once per stem
    stems = list(dict.fromkeys(split_row(row)[0] for row in methods))
    peaks = peak_memory(stems, s) if s.rss else {}  # fresh interpreters first, while this process is small
    runs = run_finetunes(planned_runs(methods, s, work), s, work)
    searched = collect_results(runs)  # with search_seeds: the search seeds' values, which choose the rates
    runs += run_finetunes(more_seeds_of_the_best_rates(searched, s, work), s, work)
    results = collect_results(runs)

    device = costs.bench_device()
    first = s.tasks[0]
    saved = step = latency = kinds = {}
    if s.costs:
        costs.torch_seed(s.seed)
        base = load_model(s.model, "seq_cls", get_task(first).num_labels).to(device)
        batch = costs.to_device(costs.real_batch(s.model, first, s.data_root, s.batch_size, s.max_length or 128), device)
        recipes = {stem: recipe_for(stem, first, s, Path("unused")) for stem in stems}
        contenders = costs.build_contenders(recipes, base, s.seed)
        print("[glue] saved bytes and step time (alternating)", flush=True)
        saved, step = costs.saved_and_step_time(contenders, batch, s.step_repeats)
        print("[glue] inference latency vs base (interleaved)", flush=True)
        latency_batch = {k: v[: s.latency_batch] for k, v in batch.items()}
        latency, kinds = costs.latency_ratios(contenders, base, latency_batch, s.latency_repeats)

    rows = []
    for (method, task), r in results.items():
        stem = split_row(method)[0]
        peak = peaks.get(stem, {})
        row = {"method": method, "task": task, "metric": r["metric"], "value": r["value"], "value_std": r["value_std"],
               "trivial_baseline": r["baseline"], "trainable_pct": r["trainable_pct"], "stored_bytes": r["stored_bytes"],
               "saved_bytes": saved.get(stem), "peak_rss_bytes": peak.get("peak_rss_bytes"),
               "step_seconds": step.get(stem), "latency_ratio": latency.get(stem), "latency_model": kinds.get(stem),
               "steps": r["steps"],
               "n_eval": r["n_eval"], "train_seconds": r["train_seconds"], "seeds": r["seeds"], "values": r["values"]}
        if peak.get("peak_cuda_bytes") is not None:
            row["peak_cuda_bytes"] = peak["peak_cuda_bytes"]
        rows.append({k: v for k, v in row.items() if v is not None or k in COLUMNS})
    rows += selected_rows(rows, s.lr_search, {cell: r["value"] for cell, r in searched.items()})
    notes = [
        f"{'quick' if quick else 'full'} settings: tasks {s.tasks}, model {s.model}, "
        + (f"max_steps {s.max_steps} (eval and checkpoint at the end only), " if s.max_steps else "recipe schedules, ")
        + f"training rows limit {s.limit}, validation rows limit {s.eval_limit}, max_length "
        f"{s.max_length or 'per recipe'}, seed per recipe ({s.seed} for the cost measurements), "
        f"{s.threads or torch_threads()} torch thread(s) per run, on {device.type}; "
        + (f"seeds {s.seeds} on {s.seed_tasks} (value = mean, value_std = sample std), the recipe's seed elsewhere."
           if s.seeds else "one seed per (method, task).")
        + (f" Learning-rate search {s.lr_search}: one row per rate (row@lr=...), and per (row, task) a selected row "
           "with the best rate on the validation split (lr, lr_grid)." if s.lr_search else "")
        + (f" The search ran seeds {s.search_seeds}; the selected rate then ran the other seeds (lr_grid: the "
           "search seeds' mean; value: every seed)." if s.search_seeds else ""),
        "recipes: configs/glue/<method>-minilm-<task>.yaml; methods without one (bitfit, supertuning) use the LoRA recipe's "
        "data/train sections with their own default options.",
        f"costs per method on the first {s.batch_size} {first} training rows (padded to the longest, max_length "
        f"{s.max_length or 128}): saved_bytes (autograd saved tensors), step_seconds (median of "
        f"{s.step_repeats} alternating rounds after 1 warm-up); latency_ratio on the first {s.latency_batch} of "
        f"them, median of {s.latency_repeats} interleaved rounds vs the unmodified base (latency_model says "
        "whether the merged model was timed); peak_rss_bytes: what training adds to a fresh interpreter's peak "
        f"(bench.costs, random tokens, batch {s.batch_size} x {s.max_length or 128}, {s.rss_steps} step(s)).",
        "stored_bytes: files in <run>/final/ without tokenizer files and peftkit.json. trivial_baseline: the metric of "
        "always predicting the training set's majority class (the mean for regression), from the run's metrics.json.",
        f"run dirs under {work}/; wall time of the bench {time.perf_counter() - started:.0f} s"
        + (f"; plots and summary in {work / 'report'}/ (as `peftkit report {work} <this JSON>` makes them)."
           if s.report else "."),
    ]
    extra = {"notes": notes, "settings": s.model_dump()}
    if s.report:  # the plots of this grid: loss curves of its runs, memory and accuracy vs trainable %
        from peftkit.report import make_report

        make_report([str(work)], str(work / "report"), {"glue": {"bench": "glue", "command": " ".join(
            ["peftkit", *sys.argv[1:]]), "rows": rows, **extra}})
    return BenchRows(rows + average_rows(rows, s.tasks), extra)


# ---- settings and registration -----------------------------------------------------------------------

class GlueSettings(BenchSettings):
    tasks: Optional[list[str]] = option(None, "GLUE tasks (quick: sst2, mrpc; full: sst2, mrpc, stsb, rte).", min_length=1)
    methods: Optional[list[str]] = option(
        None, "Rows: method names or recipe stems, optionally with train overrides (stem@lr=3e-3) (every GLUE method).",
        min_length=1)
    lr_search: Optional[dict[str, Annotated[list[Annotated[float, Field(gt=0, le=10)]], Field(min_length=1)]]] = option(
        None, "Learning-rate search: row -> rates; the row runs once per rate, and a selected row per task keeps the "
              "rate with the best validation value.")
    model: Optional[str] = option(None, "Model alias or directory (default minilm-l6).", min_length=1)
    max_steps: like_train("max_steps") = option(None, "Steps per fine-tune (quick: a fixed budget; full: the recipes').")
    limit: Optional[int] = option(None, "Training rows per task.", ge=1, le=2**31 - 1)
    eval_limit: Optional[int] = option(None, "Validation rows per task.", ge=1, le=2**31 - 1)
    max_length: Optional[int] = option(None, "Tokens per row.", ge=2, le=1_048_576)
    step_repeats: Optional[int] = option(None, "Timed steps per method in the cost columns.", ge=1, le=100_000)
    latency_repeats: Optional[int] = option(None, "Timed rounds of the latency column.", ge=1, le=100_000)
    rss_steps: Optional[int] = option(None, "Steps of each fresh-process peak measurement.", ge=1, le=100_000)
    work_dir: Optional[str] = option(None, "Where the runs go (runs/bench-glue[-quick]).", min_length=1)
    data_root: Optional[str] = option(None, "GLUE data root (env PEFTKIT_DATA_DIR).", min_length=1)
    batch_size: like_train("batch_size") = option(None, "Batch of the cost columns (16).")
    latency_batch: Optional[int] = option(None, "Batch of the latency column (8).", ge=1, le=65536)
    rss: Optional[StrictBool] = option(None, "Measure peak RSS in fresh processes (true).")
    seed: like_train("seed") = option(None, "Seed of the cost columns (42).")
    seeds: Optional[list[Annotated[int, Field(ge=0, le=2**32 - 1)]]] = option(None, "Seeds of the seed_tasks (mean and std).", min_length=1)
    search_seeds: Optional[list[Annotated[int, Field(ge=0, le=2**32 - 1)]]] = option(
        None, "Seeds the learning-rate search runs (a part of seeds); the selected rate then runs the others (all seeds).",
        min_length=1)
    seed_tasks: Optional[list[str]] = option(None, "Tasks that run every seed (mrpc, stsb, rte).")
    jobs: Optional[int] = option(None, "Parallel fine-tune processes (1).", ge=1, le=1024)
    finetune: Optional[Union[StrictBool, Literal["missing"]]] = option(None, "Fine-tune (true), only the missing runs (missing), or report what is there (false).")
    costs: Optional[StrictBool] = option(None, "Measure the cost columns (true).")
    threads: like_train("threads") = option(None, "torch threads per fine-tune.")
    report: Optional[StrictBool] = option(None, "Write the plots of the grid (true).")

    @model_validator(mode="after")
    def _searched_rows_are_in_the_grid(self):
        rows = self.methods or list(DEFAULT_ROWS)
        missing = sorted(set(self.lr_search or {}) - set(rows))
        if missing:
            raise ValueError(f"lr_search: {', '.join(missing)} is not a row of the grid (rows: {', '.join(rows)}); "
                             f"add it to methods or search one of those")
        if self.search_seeds:
            if not self.lr_search:
                raise ValueError("search_seeds: set lr_search too; the search seeds are the seeds its rates run")
            outside = sorted(set(self.search_seeds) - set(self.seeds or []))
            if outside:
                raise ValueError(f"search_seeds: {outside} are not in seeds ({self.seeds or 'unset'}); the search "
                                 "seeds are a part of the grid's seeds")
        return self


@BENCHES.register("glue", help="Every method on GLUE with its costs (metric, trainable %, stored bytes, saved bytes, step time, latency).")
class GlueBench:
    Settings = GlueSettings
    run = staticmethod(run)
