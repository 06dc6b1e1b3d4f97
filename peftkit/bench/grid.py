"""The grid of `peftkit bench glue`: which fine-tunes run, from which recipes, with which seeds, where, and what
their run dirs report.

A row is a recipe stem (``pafi-r0.001`` runs configs/glue/pafi-r0.001-minilm-<task>.yaml); ``stem@key=value,...``
overrides train keys of the stem's recipe. A learning-rate search replaces a row by one row per rate and, per
(row, task), selects the rate with the best validation value. Seeds run on the seed tasks; with search seeds the
search runs those only and the selected rate then runs the others. Fine-tunes run in this process or as parallel
`peftkit finetune` processes. The bench's docstring (bench/glue.py) says what every column means.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Optional, Protocol, Union

from peftkit.bench.costs import stored_bytes
from peftkit.bench.harness import torch_threads


class GridSettings(Protocol):
    """What the grid reads of a bench's typed settings (bench.glue.GlueSettings, filled in by harness.with_defaults)."""

    model: str
    data_root: Optional[str]
    tasks: list[str]
    methods: Optional[list[str]]
    lr_search: Optional[dict[str, list[float]]]
    seeds: Optional[list[int]]
    search_seeds: Optional[list[int]]
    seed_tasks: list[str]
    max_steps: Optional[int]
    limit: Optional[int]
    eval_limit: Optional[int]
    max_length: Optional[int]
    threads: Optional[int]
    jobs: int
    finetune: Union[bool, str]


# The rows of the grid, baselines first; apiq is left out: it needs a quantized base from `peftkit quantize`.
DEFAULT_ROWS = ("full", "lora", "bitfit", "head-only", "pafi", "hiwi", "supertuning", "meft1", "meft2", "meft3")


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


def recipe_for(row: str, task: str, s: GridSettings, run_dir: Path, seed: int | None = None) -> dict:
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
    raw["model"] = {**raw.get("model", {}), "name": s.model}
    data = raw.setdefault("data", {})
    data["task"] = task
    if s.data_root:
        data["root"] = s.data_root
    for key, value in (("limit", s.limit), ("eval_limit", s.eval_limit), ("max_length", s.max_length)):
        if value is not None:
            data[key] = value
    train = raw.setdefault("train", {})
    train.update(overrides)
    train["threads"] = s.threads or torch_threads()
    if seed is not None:
        train["seed"] = seed
    if s.max_steps is not None:
        train.update(max_steps=s.max_steps, eval_every=s.max_steps, save_every=s.max_steps,
                     log_every=max(1, s.max_steps // 10), keep_last=1)
    raw["output"] = {"dir": str(run_dir), "overwrite": True}
    return raw


def methods_to_run(s: GridSettings) -> list[str]:
    rows = list(s.methods or DEFAULT_ROWS)
    return search_rows(rows, s.lr_search)


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


def seeds_for(task: str, s: GridSettings) -> list[int | None]:
    """The seeds a task runs with: ``seeds`` for the small tasks when given, else the recipe's own (None)."""
    return list(s.seeds) if s.seeds and task in s.seed_tasks else [None]


def planned_runs(rows: list[str], s: GridSettings, work: Path,
                 seeds_of=None) -> list[tuple[str, str, int | None, Path]]:
    """(row, task, seed, run_dir) for every fine-tune of the grid: every cell's first seed before any cell's
    second, so that a grid stopped early still has one run per cell. ``seeds_of(row, task)`` gives a cell's seeds
    (default: ``first_pass_seeds``)."""
    seeds_of = seeds_of or (lambda row, task: first_pass_seeds(row, task, s))
    plan = []
    for index in range(max((len(seeds_of(row, task)) for row in rows for task in s.tasks), default=0)):
        for row in rows:
            for task in s.tasks:
                seeds = seeds_of(row, task)
                if index < len(seeds):
                    name = f"{run_dir_name(row)}-{task}" + ("" if seeds[index] is None else f"-seed{seeds[index]}")
                    plan.append((row, task, seeds[index], work / name))
    return plan


def first_pass_seeds(row: str, task: str, s: GridSettings) -> list[int | None]:
    """A cell's seeds in the first pass: a searched rate runs only the search seeds when ``search_seeds`` is set."""
    seeds = seeds_for(task, s)
    if s.search_seeds and "@" in row and split_row(row)[0] in (s.lr_search or {}):
        seeds = [seed for seed in seeds if seed is None or seed in s.search_seeds]
    return seeds


def more_seeds_of_the_best_rates(searched: dict, s: GridSettings, work: Path) -> list:
    """The second pass of a search on ``search_seeds``: the best rate of each (stem, task) on the other seeds."""
    if not s.search_seeds:
        return []
    values = {cell: r["value"] for cell, r in searched.items()}
    best = {(row, task) for (_, task), row in best_rates(values, s.lr_search).items()}

    def other_seeds(row, task):
        if (row, task) not in best:
            return []
        return [seed for seed in seeds_for(task, s) if seed is not None and seed not in s.search_seeds]

    return planned_runs(list(dict.fromkeys(row for row, _ in best)), s, work, seeds_of=other_seeds)


def run_finetunes(plan: list, s: GridSettings, work: Path) -> list:
    """Fine-tune the planned runs: in this process (jobs 1) or as ``jobs`` parallel `peftkit finetune` processes.
    Returns the runs to report: all of them, or with ``finetune: false`` those an earlier run finished (every
    cell needs one; a missing extra seed is left out and named)."""
    from peftkit.config.loader import load_recipe
    from peftkit.train.pipeline import run_training

    done = [entry for entry in plan if (entry[3] / "metrics.json").is_file()]
    if not s.finetune:
        cells = {(row, task) for row, task, *_ in plan}
        empty = sorted(cells - {(row, task) for row, task, *_ in done})
        if empty:
            raise FileNotFoundError(f"finetune is off but these (row, task) cells have no finished run "
                                    f"(metrics.json) under {work}: {empty}")
        skipped = [entry[3].name for entry in plan if entry not in done]
        if skipped:
            print(f"[glue] left out (no metrics.json): {skipped}", flush=True)
        return done
    todo = [entry for entry in plan if entry not in done] if s.finetune == "missing" else plan
    if int(s.jobs) <= 1:
        for row, task, seed, run_dir in todo:
            print(f"[glue] fine-tune {row} on {task}" + (f" (seed {seed})" if seed is not None else "")
                  + f" -> {run_dir}", flush=True)
            run_training(load_recipe(recipe_for(row, task, s, run_dir, seed), kind="finetune"))
        return plan
    run_in_parallel(todo, s, work)
    return plan


def run_in_parallel(todo: list, s: GridSettings, work: Path) -> None:
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

    with ThreadPoolExecutor(max_workers=int(s.jobs)) as pool:
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


def method_section(row: str, task: str, s: GridSettings) -> dict:
    """The raw method section of a row's recipe (name + options), as the fresh memory process rebuilds it."""
    return dict(recipe_for(row, task, s, Path("unused"))["method"])
