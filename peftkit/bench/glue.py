"""Every method on GLUE with its costs: one row per (method, task).

Per row (specs/benchmarks.md):
  metric, value     the task's headline GLUE metric on the validation split after fine-tuning with the recipe
                    configs/<method>-minilm-<task>.yaml (methods without a recipe of their own, e.g. bitfit and
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
The costs are per method (measured on the first task's batch) and repeated on each of its task rows.
The full variant runs every recipe as written (hours on CPU); --quick caps steps, rows and sequence length.

options (all optional): methods (list), tasks (list), model, work_dir, data_root, max_steps, limit, eval_limit,
max_length, batch_size, step_repeats, latency_repeats, latency_batch, rss (bool), rss_steps, seed, threads,
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

EXCLUDED_METHODS = ("apiq",)  # needs a quantized base from `peftkit quantize`: not a GLUE-from-minilm recipe
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja", "peftkit.json")
QUICK = dict(tasks=["sst2", "mrpc"], max_steps=20, limit=320, eval_limit=128, max_length=64, step_repeats=5,
             latency_repeats=20, rss_steps=1)
FULL = dict(tasks=["sst2", "mrpc", "stsb", "rte"], max_steps=None, limit=None, eval_limit=None, max_length=None,
            step_repeats=5, latency_repeats=20, rss_steps=3)
DEFAULTS = dict(methods=None, model="minilm-l6", work_dir=None, data_root=None, batch_size=16, latency_batch=8,
                rss=True, seed=42, threads=None, report=True)


class BenchRows(list):
    """Rows plus top-level JSON fields (``extra``, e.g. notes) that bench.common.write_bench adds to the file."""

    def __init__(self, rows=(), extra: dict | None = None):
        super().__init__(rows)
        self.extra = extra or {}


def settings(quick: bool, options: dict) -> dict:
    s = {**DEFAULTS, **(QUICK if quick else FULL)}
    s.update({k: v for k, v in (options or {}).items() if v is not None})
    for key in ("methods", "tasks"):
        if isinstance(s[key], str):
            s[key] = [p.strip() for p in s[key].split(",") if p.strip()]
    return s


def default_data_root() -> str | None:
    if os.environ.get("PEFTKIT_DATA_DIR"):
        return os.environ["PEFTKIT_DATA_DIR"]
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glue"
    return str(shared) if shared.is_dir() else None


# ---- recipes -----------------------------------------------------------------------------------------
def recipe_for(method: str, task: str, s: dict, run_dir: Path) -> dict:
    """The recipe dict of (method, task): its own file, else the LoRA recipe with this method's defaults."""
    from peftkit.config.loader import configs_dir, read_yaml

    own = configs_dir() / f"{method}-minilm-{task}.yaml"
    if own.is_file():
        raw = read_yaml(own)
    else:
        template = configs_dir() / f"lora-minilm-{task}.yaml"
        if not template.is_file():
            raise FileNotFoundError(f"no recipe for {method}/{task} and no {template.name} to derive one from")
        raw = read_yaml(template)
        raw["method"] = {"name": method}
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
    train["threads"] = _threads()
    if s["max_steps"] is not None:
        train.update(max_steps=s["max_steps"], eval_every=s["max_steps"], save_every=s["max_steps"],
                     log_every=max(1, s["max_steps"] // 10), keep_last=1)
    raw["output"] = {"dir": str(run_dir), "overwrite": True}
    return raw


def methods_to_run(s: dict) -> list[str]:
    from peftkit.methods import available_methods

    if s["methods"]:
        return list(s["methods"])
    return [m for m in available_methods() if m not in EXCLUDED_METHODS]


def stored_bytes(final_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(final_dir).rglob("*") if p.is_file() and p.name not in TOKENIZER_FILES)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ---- the measurements --------------------------------------------------------------------------------
def fine_tune_all(methods: list[str], s: dict, work: Path) -> dict:
    """(method, task) -> {metric, value, trainable_pct, stored_bytes, steps, train_seconds, run_dir}."""
    from peftkit.data.glue import get_task
    from peftkit.finetune import finetune

    results = {}
    for method in methods:
        for task in s["tasks"]:
            run_dir = work / f"{method}-{task}"
            print(f"[glue] fine-tune {method} on {task} -> {run_dir}", flush=True)
            finetune(recipe_for(method, task, s, run_dir), [])
            m = json.loads((run_dir / "metrics.json").read_text())
            main = get_task(task).main_metric
            results[(method, task)] = {"metric": main, "value": m[main], "baseline": m.get("baseline", {}).get(main),
                                       "trainable_pct": m["trainable_pct"],
                                       "stored_bytes": stored_bytes(run_dir / "final"), "steps": m["steps"],
                                       "train_seconds": m["train_seconds"], "n_eval": m["n_eval"],
                                       "run_dir": str(run_dir)}
    return results


def real_batch(s: dict, task: str, size: int) -> dict:
    """The first ``size`` training rows of ``task``, tokenized and padded as the trainer does."""
    from peftkit.data.glue import PadCollator, get_task, load_rows, tokenize_rows
    from peftkit.models.load import load_tokenizer

    t = get_task(task)
    tokenizer = load_tokenizer(s["model"])
    rows = load_rows(task, "train", s["data_root"], size)
    data = tokenize_rows(t, rows, tokenizer, s["max_length"] or 128)
    return PadCollator(tokenizer.pad_token_id or 0, t.is_regression)(data)


def build_contenders(methods: list[str], s: dict, base, task: str) -> dict:
    """method -> (method plugin, prepared model, options) on copies of one base model."""
    from peftkit.config.loader import load_recipe
    from peftkit.methods import get_method

    contenders = {}
    for name in methods:
        options = load_recipe(recipe_for(name, task, s, Path("unused")), []).method
        method = get_method(name)
        torch_seed(s["seed"])
        contenders[name] = (method, method.prepare(copy.deepcopy(base), options), options)
    return contenders


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def saved_and_step_time(contenders: dict, batch: dict, repeats: int) -> tuple[dict, dict]:
    import torch

    from peftkit.bench.memory import saved_tensor_bytes

    saved, times, optimizers = {}, {n: [] for n in contenders}, {}
    for name, (method, model, _) in contenders.items():
        model.train()
        torch_seed(0)
        saved[name] = saved_tensor_bytes(model, batch)
        optimizers[name] = torch.optim.AdamW(method.param_groups(model, 0.01), lr=1e-5)
    for round_ in range(repeats + 1):  # round 0 is the warm-up; contenders alternate within each round
        for name, (method, model, _) in contenders.items():
            start = time.perf_counter()
            method.compute_loss(model, batch).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
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

    seconds = time_interleaved({n: forward_of(m) for n, m in models.items()}, repeats, 3, lambda: None)
    return {n: seconds[n] / seconds["base"] for n in contenders}, kinds


def peak_rss(methods: list[str], s: dict) -> dict:
    from peftkit.bench.memory import peak_rss_in_fresh_process

    spec = {"model": s["model"], "batch": s["batch_size"], "seq": s["max_length"] or 128, "seed": 0,
            "steps": s["rss_steps"], "threads": _threads()}
    return {m: peak_rss_in_fresh_process({**spec, "method": m}) for m in methods}


def run(quick: bool, options: dict) -> list[dict]:
    import torch

    from peftkit.data.glue import get_task
    from peftkit.models.load import load_model

    s = settings(quick, options)
    s["data_root"] = s["data_root"] or default_data_root()
    if s.get("threads"):  # e.g. 1 on a shared machine: oversubscribed thread pools slow every contender
        torch.set_num_threads(int(s["threads"]))
    work = Path(s["work_dir"] or f"runs/bench-glue{'-quick' if quick else ''}")
    methods = methods_to_run(s)
    started = time.perf_counter()
    print(f"[glue] methods {methods} x tasks {s['tasks']} on {s['model']}, work dir {work}", flush=True)

    rss = peak_rss(methods, s) if s["rss"] else {}  # fresh interpreters first, while this process is small
    results = fine_tune_all(methods, s, work)

    first = s["tasks"][0]
    torch_seed(s["seed"])
    base = load_model(s["model"], "seq_cls", get_task(first).num_labels)
    batch = real_batch(s, first, s["batch_size"])
    contenders = build_contenders(methods, s, base, first)
    print("[glue] saved bytes and step time (alternating)", flush=True)
    saved, step = saved_and_step_time(contenders, batch, s["step_repeats"])
    print("[glue] inference latency vs base (interleaved)", flush=True)
    latency_batch = {k: v[: s["latency_batch"]] for k, v in batch.items()}
    latency, kinds = latency_ratios(contenders, base, latency_batch, s["latency_repeats"])

    rows = []
    for (method, task), r in results.items():
        rows.append({"method": method, "task": task, "metric": r["metric"], "value": r["value"],
                     "trivial_baseline": r["baseline"], "trainable_pct": r["trainable_pct"], "stored_bytes": r["stored_bytes"],
                     "saved_bytes": saved[method], "peak_rss_bytes": rss.get(method), "step_seconds": step[method],
                     "latency_ratio": latency[method], "latency_model": kinds[method], "steps": r["steps"],
                     "n_eval": r["n_eval"], "train_seconds": r["train_seconds"]})
    notes = [
        f"{'quick' if quick else 'full'} settings: tasks {s['tasks']}, model {s['model']}, "
        + (f"max_steps {s['max_steps']} (eval and checkpoint at the end only), " if s["max_steps"] else "recipe schedules, ")
        + f"training rows limit {s['limit']}, validation rows limit {s['eval_limit']}, max_length "
        f"{s['max_length'] or 'per recipe'}, seed per recipe ({s['seed']} for the cost measurements), "
        f"{_threads()} torch thread(s); one seed per (method, task).",
        "recipes: configs/<method>-minilm-<task>.yaml; methods without one (bitfit, supertuning) use the LoRA recipe's "
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
    return BenchRows(rows, extra)
