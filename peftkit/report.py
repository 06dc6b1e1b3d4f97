"""`peftkit report PATH...`: plots and a one-page markdown summary of runs and bench results.

A PATH may be
  * a fine-tuning run directory (metrics.jsonl / metrics.json, as `peftkit finetune` writes them),
  * a quantized model directory (errors.json, as `peftkit quantize` writes it),
  * a bench JSON file ({"bench", "rows", ...}, as `peftkit bench NAME --json FILE` writes it),
  * a directory holding any of these (one level down, e.g. a bench work dir or docs/results).
Writes into --out: loss_curves.png, memory.png, accuracy_vs_trainable.png, quant_error_per_block.png (each only
when its data is there) and report.md, which shows the pictures with the figures behind them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from peftkit.errors import UserError


@dataclass
class Run:
    name: str
    log: list[dict]  # metrics.jsonl rows
    metrics: dict | None  # metrics.json (absent while a run is unfinished)
    config: dict = field(default_factory=dict)  # config.yaml: the resolved recipe

    @property
    def method(self) -> str:
        return (self.metrics or {}).get("method") or (self.config.get("method") or {}).get("name") or self.name

    @property
    def task(self) -> str:
        return (self.metrics or {}).get("task") or (self.config.get("data") or {}).get("task") or ""


@dataclass
class Sources:
    runs: list[Run] = field(default_factory=list)
    benches: dict[str, dict] = field(default_factory=dict)  # file stem -> payload
    quantized: dict[str, list[dict]] = field(default_factory=dict)  # label -> errors.json "blocks"

    def bench_rows(self, bench: str) -> list[dict]:
        return [row for payload in self.benches.values() if payload.get("bench") == bench for row in payload["rows"]]


# ---- reading --------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except yaml.YAMLError:
        return {}
    return config if isinstance(config, dict) else {}


def _quant_label(directory: Path) -> str:
    info_file = directory / "quantization.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        method, bits = info.get("method"), info.get("bits")
        if method and bits:
            return f"{method} {bits}-bit ({directory.name})"
    return directory.name


def _add(path: Path, sources: Sources, depth: int = 0) -> bool:
    """Add what ``path`` holds; True if it held anything readable."""
    if path.is_file() and path.suffix == ".json":
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError:
            return False
        if isinstance(payload, dict) and "rows" in payload and "bench" in payload:
            sources.benches[path.stem] = payload
            return True
        return False
    if not path.is_dir():
        return False
    if (path / "metrics.jsonl").is_file() or (path / "metrics.json").is_file():
        metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").is_file() else None
        sources.runs.append(Run(path.name, _read_jsonl(path / "metrics.jsonl"), metrics, _read_config(path)))
        return True
    if (path / "errors.json").is_file():
        sources.quantized[_quant_label(path)] = json.loads((path / "errors.json").read_text()).get("blocks", [])
        return True
    if depth == 0:
        found = [_add(child, sources, 1) for child in sorted(path.iterdir())]
        return any(found)
    return False


def collect(paths: list[str]) -> Sources:
    sources = Sources()
    for text in paths:
        path = Path(text)
        if not path.exists():
            raise UserError(f"{text} does not exist; give run directories, quantized model directories or bench JSON files.")
        if not _add(path, sources):
            raise UserError(f"{text} holds nothing to report: no metrics.jsonl/metrics.json (a run), errors.json "
                            "(a quantized model) or bench JSON ({\"bench\", \"rows\"}) in it or one level below.")
    return sources


# ---- the figures ----------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(count: int, cols: int | None = None):
    """A figure with ``count`` panels, at most 3 per row (or ``cols``); returns (fig, flat list of the used axes)."""
    plt = _pyplot()
    cols = min(cols or 3, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _colour(method: str, names: list[str]):
    """The same colour for a method in every panel."""
    plt = _pyplot()
    palette = plt.get_cmap("tab10").colors
    return palette[sorted(set(names)).index(method) % len(palette)]


def _by_task(items, task_of) -> dict[str, list]:
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(task_of(item) or "runs", []).append(item)
    return groups


# ---- curves over optimizer steps: one legend entry per series, one axis per comparable quantity -----------------
def series_label(run: Run) -> str:
    """What a run is one repeat of: its name without a trailing -seedN and -<task> (a grid's run names are
    <row>-<task>[-seed<N>]); runs that differ only in their seed form one series."""
    name = re.sub(r"-seed\d+$", "", run.name)
    if run.task and name.endswith(f"-{run.task}") and len(name) > len(run.task) + 1:
        name = name[: -len(run.task) - 1]
    return name


def objective(run: Run) -> tuple[str, str]:
    """(panel title, y label) of a run's training loss. Runs share a panel only when their losses measure the same
    thing: the same fine-tuning task, or the same pretraining objective (variant and mask rate)."""
    mlm = run.config.get("mlm") if isinstance(run.config.get("mlm"), dict) else None
    if run.config.get("kind") == "pretrain" or mlm:
        variant = (mlm or {}).get("variant", "mlm")
        rate = (mlm or {}).get("mask_rate") or (0.15 if variant == "mlm" else 0.5)
        return (f"pretraining {variant}: training loss at mask rate {rate:g}",
                "MLM cross-entropy (nats per masked token)")
    task = run.task or "runs"
    if task == "wikitext2":
        return f"{task}: training loss", "cross-entropy (nats per token)"
    if task == "stsb":
        return f"{task}: training loss", "mean squared error (score units²)"
    return f"{task}: training loss", "cross-entropy (nats per example)"


def eval_metric(run: Run) -> tuple[str, str] | None:
    """(task or objective group, metric) of the evaluations that compare across a panel's runs."""
    rows = [row["eval"] for row in run.log if isinstance(row.get("eval"), dict)]
    if not rows:
        return None
    numeric = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    from peftkit.tasks.glue import TASKS_BY_NAME as TASKS

    preferred = [TASKS[run.task].main_metric] if run.task in TASKS else []
    for key in (*preferred, "eval_loss", "ppl"):
        if key in numeric:
            group = "pretraining: held-out MLM loss\n(the same masking for every variant)" if key == "eval_loss" \
                else run.task or "runs"
            return group, key
    return (run.task or "runs", numeric[0]) if numeric else None


class _Series:
    """Runs of one series (seeds of one configuration): their curves of one field, aligned on the step."""

    def __init__(self, label: str, runs: list[Run]):
        self.label, self.runs = label, runs

    def curve(self, value_of) -> tuple[list[int], list[float], list[float], list[float]]:
        """steps, mean, min, max over the runs that logged the field at that step."""
        at: dict[int, list[float]] = {}
        for run in self.runs:
            for row in run.log:
                value = value_of(row)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    at.setdefault(int(row["step"]), []).append(float(value))
        steps = sorted(at)
        return (steps, [sum(at[s]) / len(at[s]) for s in steps], [min(at[s]) for s in steps],
                [max(at[s]) for s in steps])


def _series(runs: list[Run]) -> list[_Series]:
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        grouped.setdefault(series_label(run), []).append(run)
    return [_Series(label, members) for label, members in sorted(grouped.items())]


def _styles(labels: list[str]) -> dict[str, dict]:
    """A colour and line style per series label, the same in every panel of every figure (20 colours, then dashes)."""
    plt = _pyplot()
    palette = plt.get_cmap("tab20").colors if len(labels) > 10 else plt.get_cmap("tab10").colors
    ordered = sorted(set(labels))
    return {label: {"color": palette[i % len(palette)], "linestyle": ("-", "--", ":")[(i // len(palette)) % 3]}
            for i, label in enumerate(ordered)}


CROWDED = 6  # series in one panel above which seed bands and raw values are left out (the means stay readable)


def _moving_average(values, window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def _draw(ax, series: _Series, style: dict, value_of, smooth: bool, crowded: bool):
    """The series' mean over its seeds; a min..max band over the seeds and (``smooth``) the faint raw values under
    a mean of 5 logs, unless the panel is ``crowded``. Returns the line (None when the series has no values)."""
    steps, mean, low, high = series.curve(value_of)
    if not steps:
        return None
    if len(series.runs) > 1 and not crowded:
        ax.fill_between(steps, low, high, color=style["color"], alpha=0.15, linewidth=0)
    if smooth and len(steps) >= 8:
        if not crowded:
            ax.plot(steps, mean, color=style["color"], alpha=0.25, linewidth=0.7)
        mean = _moving_average(mean, 5)
    (line,) = ax.plot(steps, mean, marker="o" if len(steps) < 8 else None, markersize=3, linewidth=1.4, **style)
    return line


class _Legend:
    """One entry per series for the whole figure (a series has the same colour in every panel), titled with what
    the lines show."""

    def __init__(self):
        self.handles: dict[str, object] = {}
        self.seeds: set[int] = set()
        self.smoothed = self.crowded = self.banded = False

    def add(self, series: _Series, line, smoothed: bool, crowded: bool) -> None:
        if line is None:
            return
        self.handles.setdefault(series.label, line)
        self.seeds.add(len(series.runs))
        self.crowded |= crowded
        self.banded |= len(series.runs) > 1 and not crowded
        self.smoothed |= smoothed

    def draw(self, fig) -> None:
        if not self.handles:
            return
        notes = []
        if max(self.seeds) > 1:
            counts = " or ".join(str(n) for n in sorted(self.seeds))
            notes.append(f"mean over {counts} seeds" + ("; band: min..max" if self.banded else ""))
        if self.smoothed:
            notes.append("mean of 5 logs" + ("" if self.crowded else "; faint: the logged values"))
        labels = sorted(self.handles)
        fig.legend([self.handles[k] for k in labels], labels, loc="upper left", bbox_to_anchor=(1.0, 0.98),
                   fontsize=8, title="\n".join(notes) or None, title_fontsize=8, frameon=False, alignment="left")


def _curve_figure(groups: dict, value_of, smooth: bool, out: Path, axis_of, cols: int | None = None) -> Path:
    """A panel per group, in key order (``axis_of(key)`` -> title, y label, log scale), a line per series, one legend."""
    styles = _styles([series_label(r) for members in groups.values() for r in members])
    fig, axes = _panels(len(groups), cols)
    legend = _Legend()
    for ax, (key, members) in zip(axes, sorted(groups.items())):
        panel = _series(members)
        crowded = len(panel) > CROWDED
        for series in panel:
            line = _draw(ax, series, styles[series.label], lambda row, k=key: value_of(row, k), smooth, crowded)
            smoothed = smooth and len(series.curve(lambda row, k=key: value_of(row, k))[0]) >= 8
            legend.add(series, line, smoothed, crowded)
        title, ylabel, log = axis_of(key)
        if log:
            ax.set_yscale("log")
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3, which="both" if log else "major")
    legend.draw(fig)
    return _save(fig, out)


def plot_loss_curves(runs: list[Run], out: Path) -> Path | None:
    """Training loss over optimizer steps: a panel per task or pretraining objective (losses of different objectives
    never share an axis), a line per series (seeds averaged), smoothed over 5 logs."""
    runs = [r for r in runs if any("loss" in row for row in r.log)]
    if not runs:
        return None
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault(objective(run), []).append(run)
    return _curve_figure(groups, lambda row, key: row.get("loss"), True, out / "loss_curves.png",
                         lambda key: (key[0], key[1], False))


def plot_eval_curves(runs: list[Run], out: Path) -> Path | None:
    """The evaluations made while training: a panel per (task, metric), a line per series."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        found = eval_metric(run)
        if found is not None and sum(isinstance(row.get("eval"), dict) for row in run.log) >= 2:
            groups.setdefault(found, []).append(run)
    if not groups:
        return None

    def axis(key):
        group, metric = key
        if metric == "eval_loss":
            return group, "cross-entropy (nats per masked token)", False
        return f"{group}: {metric} during training", metric, False

    return _curve_figure(groups, lambda row, key: (row.get("eval") or {}).get(key[1]), False,
                         out / "eval_curves.png", axis)


DYNAMICS = {"lr": ("learning rate", "learning rate", False),
            "grad_norm": ("gradient norm before clipping", "global L2 norm (log scale)", True),
            "examples_per_second": ("throughput since the start", "examples / second", False),
            "peak_rss_bytes": ("peak memory: process RSS", "MiB", False),
            "peak_cuda_allocated_bytes": ("peak memory: torch.cuda.max_memory_allocated", "MiB", False)}


def plot_training_dynamics(runs: list[Run], out: Path) -> Path | None:
    """Learning rate, gradient norm, throughput and peak memory over the steps: each its own axis and unit, and
    a panel per task (series of different tasks are different runs and are never averaged together)."""
    order = list(DYNAMICS)
    groups: dict[tuple[str, int, str], list[Run]] = {}  # a row of panels per task, a column per quantity
    for run in runs:
        for name in DYNAMICS:
            if any(isinstance(row.get(name), (int, float)) for row in run.log):
                groups.setdefault((run.task or "", order.index(name), name), []).append(run)
    if not groups:
        return None
    several_tasks = len({task for task, _, _ in groups}) > 1
    quantities = len({name for _, _, name in groups})

    def value(row, key):
        v = row.get(key[2])
        if not isinstance(v, (int, float)):
            return None
        return v / 2**20 if key[2].endswith("_bytes") else v

    def axis(key):
        title, ylabel, log = DYNAMICS[key[2]]
        return (f"{key[0]}: {title}" if several_tasks and key[0] else title), ylabel, log

    # every task shows the same quantities in practice (one trainer wrote them), so the columns line up
    return _curve_figure(groups, value, False, out / "training_dynamics.png", axis,
                         cols=quantities if several_tasks else None)


def memory_rows(sources: Sources) -> list[dict]:
    """One row per method with saved/peak-RSS bytes: the glue bench's, else the memory bench's main rows."""
    rows, seen = [], set()
    for row in sources.bench_rows("glue") or [r for r in sources.bench_rows("memory") if r.get("step_seconds")]:
        if row["method"] not in seen and row.get("saved_bytes") is not None:
            seen.add(row["method"])
            rows.append(row)
    return rows


def plot_memory(rows: list[dict], out: Path) -> Path | None:
    if not rows:
        return None
    import numpy as np

    plt = _pyplot()
    names = [r["method"] for r in rows]
    x = np.arange(len(names))
    mib = 2.0 ** 20
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4.2))
    ax.bar(x - 0.2, [r["saved_bytes"] / mib for r in rows], 0.4, label="autograd saved tensors (activations)")
    ax.bar(x + 0.2, [(r.get("peak_rss_bytes") or 0) / mib for r in rows], 0.4,
           label="peak RSS added by training (fresh process)")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="MiB", title="training memory per method (same model and batch)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "memory.png")


def accuracy_rows(sources: Sources) -> list[dict]:
    """(method, task, metric, value, trainable_pct): the glue bench's rows, else the runs' metrics.json."""
    # a row per trained cell; the bench's task-average rows have no run of their own (no trainable_pct)
    rows = [r for r in sources.bench_rows("glue") if r.get("value") is not None and r.get("trainable_pct") is not None]
    if rows:
        return rows
    from peftkit.tasks.glue import TASKS_BY_NAME as TASKS

    out = []
    for run in sources.runs:
        m = run.metrics
        if m and m.get("task") in TASKS and TASKS[m["task"]].main_metric in m:
            metric = TASKS[m["task"]].main_metric
            out.append({"method": m["method"], "task": m["task"], "metric": metric, "value": m[metric],
                        "trainable_pct": m.get("trainable_pct")})
    return out


def baselines(sources: Sources) -> dict[str, float]:
    """task -> the trivial baseline of its headline metric (majority class / mean), where a source has it."""
    found = {r["task"]: r["trivial_baseline"] for r in sources.bench_rows("glue") if r.get("trivial_baseline") is not None}
    from peftkit.tasks.glue import TASKS_BY_NAME as TASKS

    for run in sources.runs:
        m = run.metrics or {}
        if m.get("task") in TASKS and m["task"] not in found:
            value = (m.get("baseline") or {}).get(TASKS[m["task"]].main_metric)
            if value is not None:
                found[m["task"]] = value
    return found


def plot_accuracy_vs_trainable(rows: list[dict], out: Path, trivial: dict[str, float] | None = None) -> Path | None:
    rows = [r for r in rows if r.get("trainable_pct")]
    if not rows:
        return None
    groups = _by_task(rows, lambda r: r["task"])
    fig, axes = _panels(len(groups))
    names = [r["method"] for r in rows]
    for ax, (task, members) in zip(axes, groups.items()):
        # a legend, not text labels: neighbours on a log axis often share a score and their labels would collide
        markers = "osD^vP*Xh"
        for r in members:
            ax.scatter(r["trainable_pct"], r["value"], s=45, color=_colour(r["method"], names), label=r["method"],
                       marker=markers[sorted(set(names)).index(r["method"]) % len(markers)], alpha=0.85)
        if (trivial or {}).get(task) is not None:
            ax.axhline(trivial[task], color="grey", linestyle="--", linewidth=1, label="trivial baseline")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        ax.set_xscale("log")
        ax.margins(x=0.15, y=0.15)
        ax.set(title=f"{task}: {members[0]['metric']} vs trainable parameters", xlabel="trainable parameters (%)",
               ylabel=members[0]["metric"])
        ax.grid(alpha=0.3, which="both")
    return _save(fig, out / "accuracy_vs_trainable.png")


def plot_quant_errors(quantized: dict[str, list[dict]], out: Path) -> Path | None:
    series = {label: [(b["index"], b["rel_output_error"]) for b in blocks if b.get("rel_output_error") is not None]
              for label, blocks in quantized.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, points in series.items():
        ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set(title="quantization: relative output error per block", xlabel="block",
           ylabel="||Y_q - Y_fp|| / ||Y_fp||  (log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out / "quant_error_per_block.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": a figure legend beside the panels is kept
    _pyplot().close(fig)
    return path


# ---- the summary -----------------------------------------------------------------------------------------
def human_bytes(n) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def glue_section(rows: list[dict], trivial: dict[str, float] | None = None) -> str:
    if not rows:
        return ""
    parts = ["## Methods on GLUE\n"]
    for task, members in _by_task(rows, lambda r: r["task"]).items():
        best = max(members, key=lambda r: r["value"])
        parts.append(f"\n**{task}** ({members[0]['metric']}): best is **{best['method']}** at {best['value']:.3f}"
                     f" with {best['trainable_pct']:.3g}% of the parameters trained")
        if (trivial or {}).get(task) is not None:
            at_baseline = [r["method"] for r in members if r["value"] <= trivial[task] + 1e-9]
            parts.append(f"; the trivial baseline (always the training-set majority class) scores {trivial[task]:.3f}"
                         + (f", and {len(at_baseline)} of {len(members)} methods do no better" if at_baseline else ""))
        parts.append(".\n\n")
        header = ["method", members[0]["metric"], "trained", "stored", "activations", "peak RSS +", "step",
                  "latency vs base"]
        table = []
        for r in sorted(members, key=lambda r: -r["value"]):
            table.append([r["method"], f"{r['value']:.3f}", f"{r['trainable_pct']:.3g}%",
                          human_bytes(r.get("stored_bytes")), human_bytes(r.get("saved_bytes")),
                          human_bytes(r.get("peak_rss_bytes")),
                          f"{r['step_seconds'] * 1000:.0f} ms" if r.get("step_seconds") else "",
                          f"{r['latency_ratio']:.2f}x" if r.get("latency_ratio") else ""])
        shown = [i for i in range(len(header)) if any(row[i] for row in table)]  # drop columns with no data
        parts.append(md_table([header[i] for i in shown], [[row[i] for i in shown] for row in table]))
    return "".join(parts)


def peers_section(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["## peftkit vs the tools users would pick instead\n\n"]
    for r in rows:
        lines.append(f"- {r['comparison']}: peftkit {_number(r['peftkit'])}, peer {_number(r['peer'])}, "
                     f"**ratio {r['ratio']:.3f}** ({r['unit']}){_verdict(r)}.\n")
    return "".join(lines)


def _number(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _verdict(row: dict) -> str:
    """'peftkit better/worse/same' where the unit says which direction is better (within 2% = same)."""
    unit = row.get("unit", "")
    if "higher is better" in unit:
        sign = 1
    elif "lower is better" in unit:
        sign = -1
    else:
        return ""
    if abs(row["ratio"] - 1) <= 0.02:
        return ": on par"
    return ": **peftkit better**" if (row["ratio"] - 1) * sign > 0 else ": **peftkit worse**"


def runs_section(runs: list[Run]) -> str:
    finished = [r for r in runs if r.metrics]
    if not finished:
        return ""
    table = []
    for r in finished:
        m = r.metrics
        shown = ", ".join(f"{k} {m[k]:.3f}" for k in ("accuracy", "f1", "pearson", "spearman", "matthews_correlation")
                          if isinstance(m.get(k), float))
        table.append([r.name, r.method, r.task, shown, f"{m.get('trainable_pct', 0):.3g}%", m.get("steps", ""),
                      f"{m.get('train_seconds', 0):.0f} s"])
    return "## Runs\n\n" + md_table(["run", "method", "task", "metrics", "trained", "steps", "train time"], table)


def quant_section(quantized: dict[str, list[dict]]) -> str:
    table = []
    for label, blocks in quantized.items():
        errors = [b["rel_output_error"] for b in blocks if b.get("rel_output_error") is not None]
        if errors:
            worst = max(range(len(errors)), key=errors.__getitem__)
            table.append([label, len(errors), f"{errors[0]:.4f}", f"{errors[-1]:.4f}", f"{errors[worst]:.4f} (block "
                          f"{blocks[worst]['index']})"])
    if not table:
        return ""
    return "## Quantization error per block\n\n" + md_table(["model", "blocks", "first", "last", "worst"], table)


def write_summary(sources: Sources, figures: dict[str, Path | None], out: Path, inputs: list[str]) -> Path:
    parts = ["# peftkit report\n\n", "Made by `peftkit report " + " ".join(inputs) + "`.\n\n"]
    captions = {"accuracy_vs_trainable": "Quality against the share of parameters trained (further up and left is better).",
                "memory": "Training memory per method.",
                "loss_curves": "Training loss (a panel per task or pretraining objective; seeds averaged).",
                "eval_curves": "Evaluations during training.",
                "training_dynamics": "Learning rate, gradient norm, throughput and peak memory over the steps.",
                "quant_error_per_block": "Quantization error per block (lower is better)."}
    for key, caption in captions.items():
        if figures.get(key):
            parts.append(f"![{caption}]({figures[key].name})\n\n*{caption}*\n\n")
    for section in (glue_section(accuracy_rows(sources), baselines(sources)), peers_section(sources.bench_rows("peers")),
                    runs_section(sources.runs), quant_section(sources.quantized)):
        if section:
            parts.append(section + "\n")
    notes = [n for payload in sources.benches.values() for n in (payload.get("notes") or [])]
    commands = [f"`{payload.get('command', '')}` -> {stem}.json" for stem, payload in sources.benches.items()]
    if commands:
        parts.append("## Where the figures come from\n\n" + "".join(f"- {c}\n" for c in commands))
        parts.append("".join(f"- {n}\n" for n in notes))
    path = out / "report.md"
    path.write_text("".join(parts))
    return path


def make_report(paths: list[str], out_dir: str = "report", extra_benches: dict[str, dict] | None = None) -> Path:
    """Read ``paths`` (plus bench payloads not yet written to a file, name -> payload), write the PNGs and
    report.md into ``out_dir``; returns report.md's path."""
    if not paths and not extra_benches:
        raise UserError("give at least one run directory, quantized model directory or bench JSON file.")
    sources = collect(paths)
    sources.benches.update(extra_benches or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"loss_curves": plot_loss_curves(sources.runs, out),
               "memory": plot_memory(memory_rows(sources), out),
               "accuracy_vs_trainable": plot_accuracy_vs_trainable(accuracy_rows(sources), out, baselines(sources)),
               "quant_error_per_block": plot_quant_errors(sources.quantized, out),
               "eval_curves": plot_eval_curves(sources.runs, out),
               "training_dynamics": plot_training_dynamics(sources.runs, out)}
    summary = write_summary(sources, figures, out, paths)
    made = [p.name for p in figures.values() if p]
    print(f"wrote {summary}" + (f" and {', '.join(made)}" if made else " (no plottable data)"))
    return summary
