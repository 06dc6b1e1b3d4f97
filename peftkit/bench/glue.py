"""Every method on GLUE with its costs: one row per (method, task).

Per row (docs/benchmarks.md):
  metric, value     the task's headline GLUE metric on the validation split after fine-tuning with the recipe
                    configs/glue/<method>-minilm-<task>.yaml (methods without a recipe of their own, e.g. bitfit and
                    supertuning, take the LoRA recipe's data/train sections with their own default options);
  trainable_pct     parameters that train / all parameters (from the run's metrics.json);
  stored_bytes      bytes of the saved model in <run>/final/ without tokenizer files and peftkit.json: what a
                    user keeps per task (the whole model for full fine-tuning, the adapter otherwise);
  saved_bytes       bytes autograd keeps between forward and backward in one training forward on a fixed batch
                    of real training rows (bench.memory.saved_tensor_bytes: storages deduplicated, parameters and
                    buffers excluded);
  peak_rss_bytes    what training steps add to the peak RSS of a FRESH interpreter, over its own peak after
                    loading the model + optimizer state and one no-grad forward (bench.memory; random tokens,
                    same batch shape);
  step_seconds      median seconds of forward + backward + AdamW step on that batch, contenders alternating;
  latency_ratio     median inference forward of the method's model (merged where the method can merge) over the
                    unmodified base model in the same run (interleaved rounds, bench.common.time_interleaved).
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

options (all optional): methods (list of rows), lr_search (row -> list of learning rates), tasks (list), model,
work_dir, data_root, max_steps, limit,
eval_limit, max_length, batch_size, step_repeats, latency_repeats, latency_batch, rss (bool), rss_steps, seed,
seeds (list), search_seeds (list), seed_tasks (list), jobs, finetune (true | false | missing), costs (bool), threads,
report (bool: also write <work_dir>/report/ with the PNG plots and report.md, as `peftkit report` does).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, StrictBool, model_validator

from peftkit.config.base import BenchSettings, option
from peftkit.config.schema import like_train
from peftkit.utils.registry import BENCHES

COLUMNS = ("method", "task", "metric", "value", "trainable_pct", "stored_bytes", "saved_bytes", "peak_rss_bytes",
           "step_seconds", "latency_ratio")  # the columns: always present, None where not measured
# The rows of the grid, baselines first; apiq is left out: it needs a quantized base from `peftkit quantize`.
DEFAULT_ROWS = ("full", "lora", "bitfit", "head-only", "pafi", "hiwi", "supertuning", "meft1", "meft2", "meft3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja", "peftkit.json")
QUICK = dict(tasks=["sst2", "mrpc"], max_steps=20, limit=320, eval_limit=128, max_length=64, step_repeats=5,
             latency_repeats=20, rss_steps=1)
FULL = dict(tasks=["sst2", "mrpc", "stsb", "rte"], max_steps=None, limit=None, eval_limit=None, max_length=None,
            step_repeats=5, latency_repeats=20, rss_steps=3)
DEFAULTS = dict(methods=None, lr_search=None, search_seeds=None, model="minilm-l6", work_dir=None, data_root=None, batch_size=16, latency_batch=8,
                rss=True, seed=42, seeds=None, seed_tasks=["mrpc", "stsb", "rte"], jobs=1, finetune=True, costs=True, threads=None,
                report=True)


class BenchRows(list):
    """Rows plus top-level JSON fields (``extra``, e.g. notes) that bench.common.write_bench adds to the file."""

    def __init__(self, rows=(), extra: dict | None = None):
        super().__init__(rows)
        self.extra = extra or {}


def settings(quick: bool, options: dict) -> dict:
    s = {**DEFAULTS, **(QUICK if quick else FULL)}
    s.update({k: v for k, v in (options or {}).items() if v is not None})
    for key in ("methods", "tasks", "seeds", "search_seeds", "seed_tasks"):
        if isinstance(s[key], str):
            s[key] = [p.strip() for p in s[key].split(",") if p.strip()]
    for key in ("seeds", "search_seeds"):
        if s[key]:
            s[key] = [int(seed) for seed in s[key]]
    return s


def default_data_root() -> str | None:
    if os.environ.get("PEFTKIT_DATA_DIR"):
        return os.environ["PEFTKIT_DATA_DIR"]
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glue"
    return str(shared) if shared.is_dir() else None


# ---- recipes -----------------------------------------------------------------------------------------
def split_row(row: str) -> tuple[str, dict]:
    """(recipe stem, train overrides) of a row label: ``pafi@lr=3e-3,warmup_ratio=0.1`` -> ("pafi", {...})."""
    stem, _, rest = row.partition("@")
    overrides = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"row {row!r}: expected stem@key=value[,key=value], got {item!r}")
        overrides[key.strip()] = _number(value.strip())
    return stem.strip(), overrides


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def search_rows(rows: list[str], lr_search: dict | None) -> list[str]:
    """``rows`` with every row named in ``lr_search`` replaced by one row per learning rate."""
    out = []
    for row in rows:
        rates = (lr_search or {}).get(row)
        out += [f"{row}@lr={lr:g}" for lr in rates] if rates else [row]
    return out


def recipe_for(row: str, task: str, s: dict, run_dir: Path, seed: int | None = None) -> dict:
    """The recipe dict of (row, task): configs/glue/<stem>-minilm-<task>.yaml, else the LoRA recipe with method
    ``stem``'s defaults, then the row's train overrides (``stem@lr=...``); ``seed`` (when given) replaces train.seed."""
    from peftkit.config.loader import read_yaml, shipped_recipes

    row, overrides = split_row(row)
    shipped = shipped_recipes()
    own = shipped.get(f"{row}-minilm-{task}")
    if own is not None:
        raw = read_yaml(own)
    else:
        template = shipped.get(f"lora-minilm-{task}")
        if template is None:
            raise FileNotFoundError(f"no recipe for {row}/{task} and no lora-minilm-{task} to derive one from")
        raw = read_yaml(template)
        raw["method"] = {"name": row}
    raw = copy.deepcopy(raw)
    raw["model"] = {**raw.get("model", {}), "name": s["model"]}
    data = raw.setdefault("data", {})
    data["task"] = task
    if s["data_root"]:
        data["root"] = s["data_root"]
    for key in ("limit", "eval_limit", "max_length"):
        if s[key] is not None:
            data[key] = s[key]
    train = raw.setdefault("train", {})
    train.update(overrides)
    train["threads"] = s["threads"] or _threads()
    if seed is not None:
        train["seed"] = seed
    if s["max_steps"] is not None:
        train.update(max_steps=s["max_steps"], eval_every=s["max_steps"], save_every=s["max_steps"],
                     log_every=max(1, s["max_steps"] // 10), keep_last=1)
    raw["output"] = {"dir": str(run_dir), "overwrite": True}
    return raw


def methods_to_run(s: dict) -> list[str]:
    rows = list(s["methods"] or DEFAULT_ROWS)
    return search_rows(rows, s["lr_search"])


def run_dir_name(row: str) -> str:
    """A row label as a directory name: ``pafi@lr=3e-3`` -> ``pafi-lr3e-3``."""
    return row.replace("@", "-").replace("=", "").replace(",", "-")


def selected_rows(rows: list[dict], lr_search: dict | None, search_values: dict | None = None) -> list[dict]:
    """One row per searched (row, task): the learning rate with the best value, with the whole grid beside it.
    ``search_values`` ((row label, task) -> value on the search seeds) is what the choice and the grid use when the
    selected rate ran more seeds than the others; a row's own value otherwise."""
    by_cell = {(r["method"], r["task"]): r for r in rows}
    values = {cell: (search_values or {}).get(cell, r["value"]) for cell, r in by_cell.items()}
    out = []
    for (stem, task), label in best_rates(values, lr_search).items():
        grid = {split_row(row)[1]["lr"]: value for (row, t), value in values.items()
                if t == task and "@" in row and split_row(row)[0] == stem}
        out.append({**by_cell[(label, task)], "method": stem, "lr": split_row(label)[1]["lr"],
                    "lr_grid": {f"{lr:g}": value for lr, value in sorted(grid.items())}})
    return out


def average_rows(rows: list[dict], tasks: list[str]) -> list[dict]:
    """One row per row label that has every task (two or more) with the same seeds on each: task ``average``, value
    the mean of the tasks' headline values (the GLUE average). With several seeds, ``values`` holds the average of
    each seed and ``value_std`` their sample std. A label whose tasks ran different seeds (a searched rate that was
    chosen on some tasks and so ran more seeds there) gets none: its mean would mix seeds."""
    if len(tasks) < 2:
        return []
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = {r["task"]: r for r in rows if r["method"] == method}
        if not all(task in cells for task in tasks):
            continue
        seeds = [cells[task].get("seeds") for task in tasks]
        if any(s != seeds[0] for s in seeds):
            continue
        row = {"method": method, "task": "average", "metric": "mean of " + ", ".join(
            f"{task} {cells[task]['metric']}" for task in tasks),
            "value": statistics.mean(cells[task]["value"] for task in tasks)}
        if seeds[0]:
            per_seed = [statistics.mean(cells[task]["values"][i] for task in tasks) for i in range(len(seeds[0]))]
            row.update(value_std=statistics.stdev(per_seed), seeds=seeds[0], values=per_seed)
        if "lr" in cells[tasks[0]]:
            row["lr"] = {task: cells[task]["lr"] for task in tasks}
        out.append(row)
    return out


def best_rates(values: dict, lr_search: dict | None) -> dict[tuple[str, str], str]:
    """(stem, task) -> the row label (stem@lr=...) with the best value among the searched rates; ``values`` maps
    (row label, task) to a value. The first rate wins a tie. Every GLUE headline metric is higher-better."""
    best = {}
    for (row, task), value in values.items():
        stem = split_row(row)[0]
        if "@" in row and stem in (lr_search or {}):
            if (stem, task) not in best or value > values[(best[(stem, task)], task)]:
                best[(stem, task)] = row
    return best


def stored_bytes(final_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(final_dir).rglob("*") if p.is_file() and p.name not in TOKENIZER_FILES)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ---- the measurements --------------------------------------------------------------------------------
def seeds_for(task: str, s: dict) -> list[int | None]:
    """The seeds a task runs with: ``seeds`` for the small tasks when given, else the recipe's own (None)."""
    return list(s["seeds"]) if s["seeds"] and task in s["seed_tasks"] else [None]


def planned_runs(rows: list[str], s: dict, work: Path,
                 seeds_of=None) -> list[tuple[str, str, int | None, Path]]:
    """(row, task, seed, run_dir) for every fine-tune of the grid: every cell's first seed before any cell's
    second, so that a grid stopped early still has one run per cell. ``seeds_of(row, task)`` gives a cell's seeds
    (default: ``first_pass_seeds``)."""
    seeds_of = seeds_of or (lambda row, task: first_pass_seeds(row, task, s))
    plan = []
    for index in range(max((len(seeds_of(row, task)) for row in rows for task in s["tasks"]), default=0)):
        for row in rows:
            for task in s["tasks"]:
                seeds = seeds_of(row, task)
                if index < len(seeds):
                    name = f"{run_dir_name(row)}-{task}" + ("" if seeds[index] is None else f"-seed{seeds[index]}")
                    plan.append((row, task, seeds[index], work / name))
    return plan


def first_pass_seeds(row: str, task: str, s: dict) -> list[int | None]:
    """A cell's seeds in the first pass: a searched rate runs only the search seeds when ``search_seeds`` is set."""
    seeds = seeds_for(task, s)
    if s.get("search_seeds") and "@" in row and split_row(row)[0] in (s["lr_search"] or {}):
        seeds = [seed for seed in seeds if seed is None or seed in s["search_seeds"]]
    return seeds


def more_seeds_of_the_best_rates(searched: dict, s: dict, work: Path) -> list:
    """The second pass of a search on ``search_seeds``: the best rate of each (stem, task) on the other seeds."""
    if not s.get("search_seeds"):
        return []
    values = {cell: r["value"] for cell, r in searched.items()}
    best = {(row, task) for (_, task), row in best_rates(values, s["lr_search"]).items()}

    def other_seeds(row, task):
        if (row, task) not in best:
            return []
        return [seed for seed in seeds_for(task, s) if seed is not None and seed not in s["search_seeds"]]

    return planned_runs(list(dict.fromkeys(row for row, _ in best)), s, work, seeds_of=other_seeds)


def run_finetunes(plan: list, s: dict, work: Path) -> list:
    """Fine-tune the planned runs: in this process (jobs 1) or as ``jobs`` parallel `peftkit finetune` processes.
    Returns the runs to report: all of them, or with ``finetune: false`` those an earlier run finished (every
    cell needs one; a missing extra seed is left out and named)."""
    from peftkit.config.loader import load_recipe
    from peftkit.train.pipeline import run_training

    done = [entry for entry in plan if (entry[3] / "metrics.json").is_file()]
    if not s["finetune"]:
        cells = {(row, task) for row, task, *_ in plan}
        empty = sorted(cells - {(row, task) for row, task, *_ in done})
        if empty:
            raise FileNotFoundError(f"finetune is off but these (row, task) cells have no finished run "
                                    f"(metrics.json) under {work}: {empty}")
        skipped = [entry[3].name for entry in plan if entry not in done]
        if skipped:
            print(f"[glue] left out (no metrics.json): {skipped}", flush=True)
        return done
    todo = [entry for entry in plan if entry not in done] if s["finetune"] == "missing" else plan
    if int(s["jobs"]) <= 1:
        for row, task, seed, run_dir in todo:
            print(f"[glue] fine-tune {row} on {task}" + (f" (seed {seed})" if seed is not None else "")
                  + f" -> {run_dir}", flush=True)
            run_training(load_recipe(recipe_for(row, task, s, run_dir, seed), kind="finetune"))
        return plan
    run_in_parallel(todo, s, work)
    return plan


def run_in_parallel(todo: list, s: dict, work: Path) -> None:
    """``jobs`` concurrent `peftkit finetune` processes, each with its recipe under work/recipes and log under
    work/logs; raises if any of them failed."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    import yaml

    (work / "recipes").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)

    def one(entry) -> tuple[str, int]:
        row, task, seed, run_dir = entry
        recipe = work / "recipes" / f"{run_dir.name}.yaml"
        recipe.write_text(yaml.safe_dump(recipe_for(row, task, s, run_dir, seed), sort_keys=False))
        with open(work / "logs" / f"{run_dir.name}.log", "w") as log:
            code = subprocess.call([sys.executable, "-m", "peftkit", "finetune", str(recipe)], stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        print(f"[glue] {run_dir.name}: exit {code}", flush=True)
        return run_dir.name, code

    with ThreadPoolExecutor(max_workers=int(s["jobs"])) as pool:
        failed = [name for name, code in pool.map(one, todo) if code != 0]
    if failed:
        raise RuntimeError(f"fine-tunes failed (logs in {work / 'logs'}): {failed}")


def collect_results(plan: list) -> dict:
    """(row, task) -> {metric, value (mean over seeds), value_std, values, seeds, trainable_pct, ...}."""
    from peftkit.tasks.glue import get_task

    by_cell: dict[tuple[str, str], list] = {}
    for row, task, seed, run_dir in plan:
        by_cell.setdefault((row, task), []).append((seed, run_dir, json.loads((run_dir / "metrics.json").read_text())))
    results = {}
    for (row, task), runs in by_cell.items():
        main = get_task(task).main_metric
        values = [m[main] for _, _, m in runs]
        _, run_dir, first = runs[0]
        results[(row, task)] = {
            "metric": main, "value": statistics.mean(values),
            "value_std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values if len(values) > 1 else None,
            "seeds": [m.get("seed", seed) for seed, _, m in runs] if len(values) > 1 else None,
            "baseline": first.get("baseline", {}).get(main), "trainable_pct": first["trainable_pct"],
            "stored_bytes": stored_bytes(run_dir / "final"), "steps": first["steps"],
            "train_seconds": statistics.mean(m["train_seconds"] for _, _, m in runs), "n_eval": first["n_eval"],
            "run_dir": str(run_dir)}
    return results


def real_batch(s: dict, task: str, size: int) -> dict:
    """The first ``size`` training rows of ``task``, tokenized and padded as the trainer does."""
    from peftkit.models.load import load_tokenizer
    from peftkit.tasks.glue import PadCollator, get_task, load_rows, tokenize_rows

    t = get_task(task)
    tokenizer = load_tokenizer(s["model"])
    rows = load_rows(task, "train", s["data_root"], size)
    data = tokenize_rows(t, rows, tokenizer, s["max_length"] or 128)
    return PadCollator(tokenizer.pad_token_id or 0, t.is_regression)(data)


def build_contenders(methods: list[str], s: dict, base, task: str) -> dict:
    """method -> (method plugin, prepared model, options) on copies of one base model."""
    from peftkit.config.loader import load_recipe
    from peftkit.methods import create_method

    contenders = {}
    for name in methods:
        recipe = load_recipe(recipe_for(name, task, s, Path("unused")), [])
        method = create_method(recipe.method_name, recipe.method)
        torch_seed(s["seed"])
        contenders[name] = (method, method.prepare(copy.deepcopy(base)), recipe.method)
    return contenders


def method_section(row: str, task: str, s: dict) -> dict:
    """The raw method section of a row's recipe (name + options), as the fresh memory process rebuilds it."""
    return dict(recipe_for(row, task, s, Path("unused"))["method"])


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def saved_and_step_time(contenders: dict, batch: dict, repeats: int) -> tuple[dict, dict]:
    from peftkit.bench.common import training_step
    from peftkit.bench.memory import saved_tensor_bytes, synchronize

    saved, times, steps = {}, {n: [] for n in contenders}, {}
    for name, (method, model, _) in contenders.items():
        model.train()
        torch_seed(0)
        saved[name] = saved_tensor_bytes(model, batch)
        steps[name] = training_step(method, model)
    for round_ in range(repeats + 1):  # round 0 is the warm-up; contenders alternate within each round
        for name, (method, model, _) in contenders.items():
            device = next(model.parameters()).device
            synchronize(device)
            start = time.perf_counter()
            steps[name](batch)
            synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return saved, {n: statistics.median(t) for n, t in times.items()}


def latency_ratios(contenders: dict, base, batch: dict, repeats: int) -> tuple[dict, dict]:
    """method -> latency ratio to the base (merged model where the method can merge); and what was timed."""
    import torch

    from peftkit.bench.common import time_interleaved

    models, kinds = {"base": copy.deepcopy(base).eval()}, {}
    for name, (method, model, _) in contenders.items():
        if method.can_merge:
            models[name], kinds[name] = method.merge(copy.deepcopy(model)).eval(), "merged"
        else:
            models[name], kinds[name] = copy.deepcopy(model).eval(), "unmerged"
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def forward_of(model):
        def forward():
            with torch.inference_mode():
                return model(**inputs).logits
        return forward

    device = next(base.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = time_interleaved({n: forward_of(m) for n, m in models.items()}, repeats, 3, sync)
    return {n: seconds[n] / seconds["base"] for n in contenders}, kinds


def peak_memory(rows: list[str], s: dict) -> dict:
    """row -> {"peak_rss_bytes", "peak_cuda_bytes"} from a fresh interpreter per row (bench.memory)."""
    from peftkit.bench.memory import bench_device, peak_memory_in_fresh_process

    spec = {"model": s["model"], "batch": s["batch_size"], "seq": s["max_length"] or 128, "seed": 0,
            "steps": s["rss_steps"], "threads": s["threads"] or _threads(), "device": str(bench_device())}
    peaks = {}
    for row in rows:
        options = method_section(row, s["tasks"][0], s)
        peaks[row] = peak_memory_in_fresh_process({**spec, "method": options.pop("name"), "method_options": options})
    return peaks


def run(quick: bool, options: dict) -> list[dict]:
    import torch

    from peftkit.models.load import load_model
    from peftkit.tasks.glue import get_task

    s = settings(quick, options)
    s["data_root"] = s["data_root"] or default_data_root()
    if s.get("threads"):  # e.g. 1 on a shared machine: oversubscribed thread pools slow every contender
        torch.set_num_threads(int(s["threads"]))
    work = Path(s["work_dir"] or f"runs/bench-glue{'-quick' if quick else ''}")
    methods = methods_to_run(s)
    started = time.perf_counter()
    print(f"[glue] methods {methods} x tasks {s['tasks']} on {s['model']}, work dir {work}", flush=True)

    # costs do not depend on a row's train overrides (they use the bench's own batch): measured once per stem
    stems = list(dict.fromkeys(split_row(row)[0] for row in methods))
    peaks = peak_memory(stems, s) if s["rss"] else {}  # fresh interpreters first, while this process is small
    runs = run_finetunes(planned_runs(methods, s, work), s, work)
    searched = collect_results(runs)  # with search_seeds: the search seeds' values, which choose the rates
    runs += run_finetunes(more_seeds_of_the_best_rates(searched, s, work), s, work)
    results = collect_results(runs)

    from peftkit.bench.memory import bench_device, to_device

    device = bench_device()
    first = s["tasks"][0]
    saved = step = latency = kinds = {}
    if s["costs"]:
        torch_seed(s["seed"])
        base = load_model(s["model"], "seq_cls", get_task(first).num_labels).to(device)
        batch = to_device(real_batch(s, first, s["batch_size"]), device)
        contenders = build_contenders(stems, s, base, first)
        print("[glue] saved bytes and step time (alternating)", flush=True)
        saved, step = saved_and_step_time(contenders, batch, s["step_repeats"])
        print("[glue] inference latency vs base (interleaved)", flush=True)
        latency_batch = {k: v[: s["latency_batch"]] for k, v in batch.items()}
        latency, kinds = latency_ratios(contenders, base, latency_batch, s["latency_repeats"])

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
    rows += selected_rows(rows, s["lr_search"], {cell: r["value"] for cell, r in searched.items()})
    notes = [
        f"{'quick' if quick else 'full'} settings: tasks {s['tasks']}, model {s['model']}, "
        + (f"max_steps {s['max_steps']} (eval and checkpoint at the end only), " if s["max_steps"] else "recipe schedules, ")
        + f"training rows limit {s['limit']}, validation rows limit {s['eval_limit']}, max_length "
        f"{s['max_length'] or 'per recipe'}, seed per recipe ({s['seed']} for the cost measurements), "
        f"{s['threads'] or _threads()} torch thread(s) per run, on {device.type}; "
        + (f"seeds {s['seeds']} on {s['seed_tasks']} (value = mean, value_std = sample std), the recipe's seed elsewhere."
           if s["seeds"] else "one seed per (method, task).")
        + (f" Learning-rate search {s['lr_search']}: one row per rate (row@lr=...), and per (row, task) a selected row "
           "with the best rate on the validation split (lr, lr_grid)." if s["lr_search"] else "")
        + (f" The search ran seeds {s['search_seeds']}; the selected rate then ran the other seeds (lr_grid: the "
           "search seeds' mean; value: every seed)." if s["search_seeds"] else ""),
        "recipes: configs/glue/<method>-minilm-<task>.yaml; methods without one (bitfit, supertuning) use the LoRA recipe's "
        "data/train sections with their own default options.",
        f"costs per method on the first {s['batch_size']} {first} training rows (padded to the longest, max_length "
        f"{s['max_length'] or 128}): saved_bytes (autograd saved tensors), step_seconds (median of "
        f"{s['step_repeats']} alternating rounds after 1 warm-up); latency_ratio on the first {s['latency_batch']} of "
        f"them, median of {s['latency_repeats']} interleaved rounds vs the unmodified base (latency_model says "
        "whether the merged model was timed); peak_rss_bytes: what training adds to a fresh interpreter's peak "
        f"(bench.memory, random tokens, batch {s['batch_size']} x {s['max_length'] or 128}, {s['rss_steps']} step(s)).",
        "stored_bytes: files in <run>/final/ without tokenizer files and peftkit.json. trivial_baseline: the metric of "
        "always predicting the training set's majority class (the mean for regression), from the run's metrics.json.",
        f"run dirs under {work}/; wall time of the bench {time.perf_counter() - started:.0f} s"
        + (f"; plots and summary in {work / 'report'}/ (as `peftkit report {work} <this JSON>` makes them)."
           if s["report"] else "."),
    ]
    extra = {"notes": notes, "settings": dict(s)}
    if s["report"]:  # the plots of this grid: loss curves of its runs, memory and accuracy vs trainable %
        from peftkit.report import make_report

        make_report([str(work)], str(work / "report"), {"glue": {"bench": "glue", "command": " ".join(
            ["peftkit", *sys.argv[1:]]), "rows": rows, **extra}})
    return BenchRows(rows + average_rows(rows, s["tasks"]), extra)


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
