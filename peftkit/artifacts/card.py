"""The model card of an export (its README.md) and what it says: the formats, how each loader serves each one,
the export's files and their sizes next to the base model's weights."""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.artifacts.load import BASE_DIR, HEAD_CLASSES, final_dir

LOADERS = ("transformers", "peft", "peftkit")
DELTA_LOADER = "apply_delta.py"  # the delta format's loader, shipped in every delta export

# How each format is loaded by each loader: the code a user runs, or None with the reason it does not apply.
LOAD_RECIPES: dict[str, dict[str, tuple[str | None, str]]] = {
    "transformers": {
        "transformers": ("AutoModelFor<Head>.from_pretrained(DIR)", "a plain model of the base architecture"),
        "peft": (None, "nothing to adapt: the changes are in the weights"),
        "peftkit": ("peftkit.load(DIR)", ""),
    },
    "peft": {
        "transformers": (None, "the adapter needs peft (transformers alone loads only base/)"),
        "peft": ("PeftModel.from_pretrained(AutoModelFor<Head>.from_pretrained(DIR/base or hub id), DIR)", ""),
        "peftkit": ("peftkit.load(DIR)", ""),
    },
    "delta": {
        "transformers": ("apply_delta(AutoModelFor<Head>.from_pretrained(DIR/base or hub id), DIR), with "
                         "DIR/apply_delta.py (torch + safetensors only)", ""),
        "peft": (None, "not a peft tuner: sparse entries / merged-away adapters"),
        "peftkit": ("peftkit.load(DIR)", ""),
    },
    "peftkit": {
        "transformers": (None, "MEFT: no transformers class computes its reversible network; ApiQ: base/ is a "
                               "quantize output, which transformers loads with GPTQModel when it is GPTQ-packed "
                               "(RTN, ApiQ) and with bitsandbytes when it is NF4; NF2/NF3 ones only peftkit"),
        "peft": (None, "see transformers"),
        "peftkit": ("peftkit.load(DIR)", ""),
    },
}

def base_weight_bytes(name: str) -> int | None:
    """Bytes of the safetensors weights of the base model ``name`` when it is on this machine."""
    from peftkit.models.aliases import resolve_model

    path = Path(resolve_model(name))
    if not path.is_dir():
        return None
    files = list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) or None


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def size_rows(out: Path, exported: dict) -> list[dict]:
    """What the export holds, top-level entry by entry, with its size next to the base model's weights."""
    ref = exported.get("export", {}).get("source_model")
    base_bytes = base_weight_bytes(ref) if ref else None
    rows = []
    for path in sorted(Path(out).iterdir()):
        if path.name.startswith("."):
            continue
        size = size_of(path)
        row = {"entry": path.name + ("/" if path.is_dir() else ""), "bytes": size, "size": human(size)}
        if base_bytes and (path.suffix == ".safetensors" or path.name == BASE_DIR):
            row["of base weights"] = f"{100 * size / base_bytes:.2f}%"
        rows.append(row)
    if base_bytes:
        rows.append({"entry": f"(base model weights: {ref})", "bytes": base_bytes, "size": human(base_bytes)})
    return rows


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def load_snippets(directory: str, exported: dict) -> dict[str, str]:
    """loader -> the Python that loads this export with it (only the loaders that apply)."""
    fmt = exported["export"]["format"]
    head = HEAD_CLASSES[(exported.get("model") or {}).get("task_head", "seq_cls")]
    base = exported["export"].get("base")
    base_expr = f'"{directory}/{BASE_DIR}"' if base == BASE_DIR else (
        f'"{base}"' + (f", num_labels={exported['num_labels']}" if exported.get("num_labels") else ""))
    snippets = {"peftkit": f'import peftkit\nmodel, tokenizer = peftkit.load("{directory}")'}
    if fmt == "transformers":
        snippets["transformers"] = (f"from transformers import {head}, AutoTokenizer\n"
                                    f'model = {head}.from_pretrained("{directory}")\n'
                                    f'tokenizer = AutoTokenizer.from_pretrained("{directory}")')
    elif fmt == "peft":
        snippets["peft"] = (f"from peft import PeftModel\nfrom transformers import {head}, AutoTokenizer\n"
                            f'model = PeftModel.from_pretrained({head}.from_pretrained({base_expr}), "{directory}")\n'
                            f'tokenizer = AutoTokenizer.from_pretrained("{directory}")')
    elif fmt == "delta":
        snippets["transformers"] = (f'import sys\nsys.path.insert(0, "{directory}")  # {DELTA_LOADER}: torch + '
                                    f"safetensors only\nfrom apply_delta import apply_delta\n"
                                    f"from transformers import {head}, AutoTokenizer\n"
                                    f'model = apply_delta({head}.from_pretrained({base_expr}), "{directory}")\n'
                                    f'tokenizer = AutoTokenizer.from_pretrained("{directory}")')
    return snippets


FORMAT_WORDS = {
    "transformers": "a plain transformers model of the base architecture (the method merged into the weights: no "
                    "added latency)",
    "peft": "a peft adapter on the base model",
    "delta": "the compact delta of the trained tensors (delta.json + delta.safetensors, applied by apply_delta.py) "
             "on the base model",
    "peftkit": "the run's own saved state on the base model; only peftkit builds this network",
}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_card(run: str | Path, out: Path, exported: dict, shown_as: str | None = None) -> str:
    """README.md of an export: what it is, where it came from, how well it does, how to load it."""
    directory = final_dir(run)
    run_dir = directory.parent if directory.name == "final" else directory
    metrics = _read_json(run_dir / "metrics.json")
    recipe = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    e = exported["export"]
    method = exported.get("method", "unknown")
    options = ", ".join(f"{k}={v}" for k, v in (exported.get("options") or {}).items()) or "defaults"
    task = exported.get("task") or metrics.get("task") or "unknown task"
    base = e.get("source_model") or "(see the source run)"
    where = {None: "merged into these weights", BASE_DIR: f"copied into {BASE_DIR}/"}.get(e.get("base"), f"hub id {e.get('base')}")
    lines = [f"# {method} fine-tune of {base} on {task}", "",
             f"Exported by peftkit {e['peftkit_version']} with `{e['command']}`.", "",
             "| | |", "|---|---|",
             f"| base model | {base} ({where}) |",
             f"| method | {method} ({options}) |",
             f"| format | {e['format']}: {FORMAT_WORDS[e['format']]} |"]
    if metrics:
        shown = {k: v for k, v in metrics.items() if k in ("accuracy", "f1", "pearson", "spearman",
                                                           "matthews_correlation", "glue_score", "ppl")}
        baseline = metrics.get("baseline") or {}
        lines.append("| metrics | " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
                     + (" (trivial baseline: " + ", ".join(f"{k} {v:.4f}" for k, v in baseline.items()) + ")"
                        if baseline else "") + " |")
        lines.append(f"| data | {task}: trained on split {metrics.get('train_split', 'train')}, evaluated on "
                     f"{metrics.get('eval_split', 'the validation split')} ({metrics.get('n_eval', '?')} rows), max_length "
                     f"{exported.get('max_length', '?')} |")
        if "trainable_params" in metrics:
            lines.append(f"| trainable parameters | {metrics['trainable_params']:,} of {metrics['total_params']:,} "
                         f"({metrics['trainable_pct']:.3f}%) |")
        lines.append(f"| training | {metrics.get('steps', '?')} steps, seed {metrics.get('seed', '?')}, "
                     f"{metrics.get('train_seconds', 0):.0f} s |")
    stored = e.get("stored_numbers") or {}
    if stored:
        lines.append("| stored numbers | " + ", ".join(f"{k} {v:,}" for k, v in stored.items()) + " |")
    from peftkit.tasks.glue import LABEL_NAMES

    if exported.get("num_labels") and len(LABEL_NAMES.get(task, ())) == exported["num_labels"]:
        lines.append("| labels (id2label) | " + ", ".join(f"{i} {n}" for i, n in enumerate(LABEL_NAMES[task])) + " |")
    lines += ["", "## Loading", ""]
    snippets = load_snippets(shown_as or str(out), exported)
    for loader in LOADERS:
        if loader in snippets:
            lines += [f"With {loader}:", "", "```python", snippets[loader], "```", ""]
        else:
            fmt_recipe = LOAD_RECIPES[e["format"]][loader]
            lines += [f"With {loader} alone: not applicable ({fmt_recipe[1]}).", ""]
    if e["format"] == "delta":
        lines += ["The delta format is described at the top of apply_delta.py.", ""]
    if e.get("base") == BASE_DIR:
        lines += [f"`{BASE_DIR}/` is a copy of the base model, so the export does not depend on the machine it was "
                  f"trained on" + ("; adapter_config.json names it by its absolute path where the export was written, "
                                   "so peft's AutoPeftModel loads the export from any working directory; after moving "
                                   "the export, load the base as shown above (peftkit finds it either way)."
                                   if (out / "adapter_config.json").is_file() else "."), ""]
    lines += ["## Files", "", "| entry | size | of base weights |", "|---|---|---|"]
    for row in size_rows(out, exported):
        lines.append(f"| {row['entry']} | {row['size']} | {row.get('of base weights', '')} |")
    if recipe:
        lines += ["", "## Recipe", "", "The resolved recipe of the run (its config.yaml):", "", "```yaml", recipe.rstrip(), "```"]
    return "\n".join(lines) + "\n"
