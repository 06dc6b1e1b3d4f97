"""Take a finished run out of peftkit: what ``peftkit export`` writes, what loads it, and ``peftkit.load``.

An export directory holds one of four formats, chosen from the method and ``--merge`` / ``--no-merge``:

* ``transformers``: a plain model directory (safetensors, config with id2label, tokenizer, generation config for
  decoders): every mergeable method with ``--merge``, and full fine-tuning either way;
* ``peft``: a peft adapter directory whose ``base_model_name_or_path`` is a hub id or ``base`` (a copy of the
  base model inside the export): LoRA and Super-Tuning with ``--no-merge``;
* ``delta``: the compact delta of PaFi / HiWi / BitFit (peftkit/methods/delta_format.py, shipped in the export as
  ``apply_delta.py``) next to its base;
* ``peftkit``: the run's own saved state next to its base, which only peftkit loads: MEFT (its reversible
  two-stream network is no transformers architecture) and ApiQ without merging (its base, a quantize output
  directory, travels as ``base/``; GPTQ-packed ones also load in transformers + GPTQModel and peft, NF4 ones in
  transformers + bitsandbytes and peft).

Every export also holds ``export.json`` (the run's metadata, the format and the base reference, which
``load_export`` and ``peftkit eval`` read) and a model card, ``README.md``.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

from peftkit.errors import UserError
from peftkit.methods import delta_format
from peftkit.methods.trained import (
    EXPORT_INFO_FILE,
    INFO_FILE,
    final_dir,
    load_base_of,
    load_with_method,
    read_run_info,
)

FORMATS = ("transformers", "peft", "delta", "peftkit")
LOADERS = ("transformers", "peft", "peftkit")
BASE_DIR = "base"
DELTA_LOADER = "apply_delta.py"
CARD = "README.md"
HEAD_CLASSES = {"seq_cls": "AutoModelForSequenceClassification", "causal_lm": "AutoModelForCausalLM",
                "mlm": "AutoModelForMaskedLM"}
# Run files that are no part of a method's saved state (a quantize output is a run directory too).
RUN_FILES = {".peftkit-run", ".lock", "train.log", "env.json", "config.yaml", "checkpoints", "metrics.jsonl",
             "plan.json", "README.md", INFO_FILE, EXPORT_INFO_FILE}

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


def export_format(method, merge: bool | None) -> str:
    """The format ``peftkit export`` writes for ``method`` (None: merge when the method can)."""
    if merge is None:
        merge = method.can_merge
    if merge and not method.can_merge:
        raise UserError(
            f"a {method.name} run cannot be merged into a plain transformers model: "
            + ("MEFT makes the network reversible (two streams, couplings y1 = lambda*x1 + F(x2), y2 = beta*x2 + "
               "G(y1), adapters between the pretrained sub-blocks), which no transformers class computes. "
               if method.name.startswith("meft") else "")
            + "Export it with --no-merge: a directory that peftkit.load() and peftkit eval serve.")
    return "transformers" if merge else method.unmerged_export


def interop_rows() -> list[dict]:
    """The interop matrix of every registered method, from the methods' own declarations: for each method and
    each of --merge / --no-merge, the format written and how each loader serves it."""
    from peftkit.methods import create_method
    from peftkit.utils.registry import METHODS

    rows = []
    for name in METHODS.names():
        method = create_method(name)
        for merge in (True, False):
            try:
                fmt = export_format(method, merge)
            except UserError:
                fmt = None
            row = {"method": name, "export": "--merge" if merge else "--no-merge", "format": fmt or "refused"}
            for loader in LOADERS:
                code, why = LOAD_RECIPES[fmt][loader] if fmt else (None, "no merged form exists")
                row[loader] = code if code else f"n/a: {why}"
            rows.append(row)
    return rows


def interop_markdown() -> str:
    """docs/interop.md: the interop matrix as a table (written by scripts/make_interop.py; a test keeps it fresh)."""
    rows = interop_rows()
    lines = ["# Interop: what `peftkit export` writes and what loads it", "",
             "Generated by `python scripts/make_interop.py` from `peftkit.methods.export.interop_rows` (the methods' own",
             "`can_merge` and `unmerged_export`); `tests/export/test_interop.py` loads every cell on a tiny trained run and",
             "checks its logits against peftkit's loaded run (max abs difference <= 1e-4, fp32).", "",
             "`peftkit export RUN --out DIR [--merge | --no-merge]` (default: merge when the method can). `<Head>` is the",
             "task's head class (SequenceClassification, CausalLM). `DIR/base` is a copy of the base model, made when the",
             "run's base is a directory of the training machine (an alias or a path); a hub id is kept as it is. An",
             "export's `adapter_config.json` names `DIR/base` by its absolute path (where `peftkit export` wrote it), so",
             "`AutoPeftModelFor<Head>.from_pretrained(DIR)` works from any working directory; after moving the export, pass",
             "the base explicitly as in the peft column (`peftkit.load(DIR)` finds `DIR/base` wherever DIR is).", "",
             "| method | export | format | transformers | peft | peftkit |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(f"`{r[k]}`" if k == "export" else
                                         r[k].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
                                         for k in ("method", "export", "format", *LOADERS)) + " |")
    lines += ["", "Formats:", ""]
    lines += [f"- `{fmt}`: {FORMAT_WORDS[fmt]}." for fmt in FORMATS]
    lines += ["", "MEFT replaces the encoder by a reversible two-stream stack (y1 = lambda*x1 + F(x2), y2 = beta*x2 + G(y1),",
              "adapters between the pretrained sub-blocks, the output the mean of both streams). No transformers class",
              "computes that network and its adapters cannot be folded into the pretrained weights, so `--merge` is",
              "refused and `--no-merge` writes the run's adapters and head next to the base, which `peftkit.load(DIR)`",
              "and `peftkit eval --model DIR` serve.", "",
              "The delta format (`delta.json` + `delta.safetensors`, applied by the `apply_delta.py` shipped in the",
              "export, which needs only torch and safetensors) is described in `peftkit/methods/delta_format.py`.", ""]
    return "\n".join(lines)


# ---- writing ------------------------------------------------------------------------------------------

def _label_config(config, info: dict) -> None:
    """id2label / label2id from the task's class names (GLUE), where the run records its task."""
    from peftkit.tasks.glue import LABEL_NAMES

    names = LABEL_NAMES.get(info.get("task") or "")
    if names and info.get("num_labels") == len(names):
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}


def _is_local(name: str) -> bool:
    from peftkit.models.aliases import resolve_model

    return Path(resolve_model(name)).exists()


def _write_base(out: Path, info: dict) -> str:
    """Make the base reachable from the export: a hub id stays a hub id; a local directory or alias (a path of
    this machine) is copied into out/base. Returns the reference written into export.json."""
    from peftkit.models.aliases import resolve_model
    from peftkit.models.load import load_tokenizer

    name = info["model"]["name"]
    if not _is_local(name):
        return name
    source = Path(resolve_model(name))
    target = out / BASE_DIR
    method, base = load_base_of(info)
    if getattr(method, "quant_dir", None) is not None:  # a quantize output directory: copied as it is
        shutil.copytree(source, target, ignore=lambda d, names: [n for n in names if Path(d) == source and n in RUN_FILES])
        return BASE_DIR
    _label_config(base.config, info)
    base.save_pretrained(target, safe_serialization=True)
    load_tokenizer(name).save_pretrained(target)
    return BASE_DIR


def _copy_state(source: Path, out: Path, names: list[str] | None = None) -> None:
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in RUN_FILES and (names is None or path.name in names):
            shutil.copy2(path, out / path.name)


def _point_adapter_at(out: Path, base_ref: str, shown_as: str | None = None) -> None:
    """Name the base in adapter_config.json the way peft finds it from any working directory: a copied base/ by its
    absolute path where the export will be (``shown_as``, else ``out``), a hub id as it is. peft's AutoPeftModel
    resolves a relative base_model_name_or_path against the working directory, not the adapter's directory.
    export.json keeps the relative "base", which peftkit resolves against the export: a moved export still loads
    in peftkit (and in peft with the base given explicitly, as the model card shows)."""
    config_path = out / "adapter_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = (str(Path(shown_as or out).resolve() / BASE_DIR) if base_ref == BASE_DIR
                                             else base_ref)
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def write_export(run: str | Path, out: Path, merge: bool | None, command: str, shown_as: str | None = None) -> dict:
    """Write the export of ``run`` (a run directory or its final/) into the existing empty directory ``out``,
    model card included (its loading code names ``shown_as``, where the directory will be; default ``out``);
    return export.json's content. The caller makes the directory appear atomically."""
    from peftkit.methods import create_method
    from peftkit.models.load import load_tokenizer

    directory = final_dir(run)
    if not (directory / INFO_FILE).is_file():
        return _export_plain(directory, out, command, shown_as)
    info = read_run_info(directory / INFO_FILE)
    method = create_method(info["method"], info["options"])
    fmt = export_format(method, merge)
    model = load_with_method(directory, info).eval()
    tokenizer = load_tokenizer(str(directory))
    base_ref, stored = None, {}
    if fmt == "transformers":
        plain = method.merge(model) if method.can_merge else model
        _label_config(plain.config, info)
        plain.save_pretrained(out, safe_serialization=True)
        if info["model"].get("task_head") == "causal_lm" and not (out / "generation_config.json").is_file():
            plain.generation_config.save_pretrained(out)
        stored["weights"] = sum(t.numel() for t in plain.state_dict().values())
    elif fmt == "peft":
        _copy_state(directory, out, ["adapter_config.json", "adapter_model.safetensors"])
        base_ref = _write_base(out, info)
        _point_adapter_at(out, base_ref, shown_as)
        stored["adapter"] = _numel(out / "adapter_model.safetensors")
    elif fmt == "delta":
        manifest = delta_format.write_delta(out, method.export_delta(model))
        (out / DELTA_LOADER).write_text(inspect.getsource(delta_format))
        base_ref = _write_base(out, info)
        stored["delta"] = _numel(out / delta_format.TENSORS)
        stored["delta_indices"] = _numel(out / delta_format.TENSORS, lambda k: k.endswith(".indices"))
        stored["delta_tensors"] = len(manifest["tensors"])
    else:  # peftkit: the run's own saved state
        _copy_state(directory, out)
        base_ref = _write_base(out, info)
        _point_adapter_at(out, base_ref, shown_as)
        stored["state"] = sum(_numel(p) for p in out.glob("*.safetensors"))
    tokenizer.save_pretrained(out)
    merged = method.can_merge if merge is None else merge
    exported = {**info, "model": {**info["model"], "name": base_ref or info["model"]["name"]},
                "export": {"format": fmt, "merged": bool(merged and method.can_merge), "base": base_ref,
                           "source": str(run), "source_model": info["model"]["name"], "command": command,
                           "stored_numbers": stored, "peftkit_version": _version()}}
    (out / EXPORT_INFO_FILE).write_text(json.dumps(exported, indent=2) + "\n")
    (out / CARD).write_text(model_card(run, out, exported, shown_as))
    return exported


def _export_plain(directory: Path, out: Path, command: str, shown_as: str | None = None) -> dict:
    """A directory without peftkit metadata but with a transformers config (a pretraining run's final/)."""
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} is neither a peftkit run (no final/{INFO_FILE}) nor a transformers checkpoint "
                        f"(no config.json). Give a run directory (runs/<name>) that finished training.")
    from peftkit.models.load import check_model_dir

    check_model_dir(directory, str(directory), any_model_type=True)  # a damaged file is not passed on
    _copy_state(directory, out)
    exported = {"export": {"format": "transformers", "merged": False, "base": None, "source": str(directory),
                           "command": command, "peftkit_version": _version()}}
    (out / EXPORT_INFO_FILE).write_text(json.dumps(exported, indent=2) + "\n")
    (out / CARD).write_text(model_card(directory, out, exported, shown_as))
    return exported


def _numel(path: Path, keep=lambda key: True) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        total = 0
        for key in f.keys():
            if keep(key):
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def _version() -> str:
    from peftkit import __version__

    return __version__


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


# ---- loading ------------------------------------------------------------------------------------------

def read_export_info(directory: Path) -> dict:
    path = Path(directory) / EXPORT_INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e}); it should be the export.json peftkit export wrote.") from None
    fmt = info.get("export", {}).get("format") if isinstance(info, dict) and isinstance(info.get("export"), dict) else None
    if fmt not in FORMATS:
        raise UserError(f"{path} is not the metadata of a peftkit export (format {fmt!r}, expected one of "
                        f"{', '.join(FORMATS)}). Export the run again with peftkit export.")
    return info


def _base_path(directory: Path, info: dict) -> str:
    ref = info["export"].get("base") or info["model"]["name"]
    return str(directory / ref) if ref == BASE_DIR else ref


def _auto_class(info: dict):
    import transformers

    head = (info.get("model") or {}).get("task_head", "seq_cls")
    return getattr(transformers, HEAD_CLASSES[head])


EXPORT_REMEDY = "Export the run again with peftkit export (or copy the export again, whole)."


def _checked_base(directory: Path, info: dict) -> str:
    """Where the export's base loads from, its files checked when it is a directory of this machine (a copied base/
    or a local path); a hub id is left to transformers."""
    from peftkit.models.load import check_model_dir, locate

    path = _base_path(directory, info)
    if info["export"].get("base") == BASE_DIR and not Path(path).is_dir():
        raise UserError(f"the export {directory} names its base as {BASE_DIR}/, and {path} does not exist. "
                        f"{EXPORT_REMEDY}")
    located = locate(path)
    if Path(located).is_dir():
        check_model_dir(located, path, any_model_type=True)
    return located


def check_export(directory: Path, info: dict) -> None:
    """Every weights file the export's format loads, checked before any is opened: present, not a pickle, not
    truncated, every floating tensor finite (the base is checked where it loads)."""
    from peftkit.methods import create_method
    from peftkit.models.load import check_model_dir, check_weights_file

    fmt, what = info["export"]["format"], f"the {info['export']['format']} export {directory} cannot be loaded"
    if fmt == "transformers":
        check_model_dir(directory, str(directory), any_model_type=True)
    elif fmt == "delta":
        check_weights_file(directory / delta_format.TENSORS, what, EXPORT_REMEDY)
    elif fmt == "peft":
        create_method(info["method"], info.get("options") or {}).check_saved(directory, what, EXPORT_REMEDY)
    # "peftkit": load_with_method checks the method's own files


def load_export(directory: str | Path, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer, info) of an export directory, each format by its own loader; every weights
    file is checked before it is opened."""
    import torch
    from transformers import AutoTokenizer

    directory = Path(directory)
    info = read_export_info(directory)
    fmt = info["export"]["format"]
    if fmt != "transformers" and not (isinstance(info.get("model"), dict) and info["model"].get("name")
                                      and info.get("method")):
        raise UserError(f"{directory / EXPORT_INFO_FILE} lacks the run's method or model. {EXPORT_REMEDY}")
    check_export(directory, info)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    kwargs = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    # a hub base has its own head size; a copied base/ was saved with the task's
    base_kwargs = dict(kwargs)
    if info["export"].get("base") not in (None, BASE_DIR) and info.get("num_labels"):
        base_kwargs.update(num_labels=info["num_labels"], ignore_mismatched_sizes=True)
    if fmt == "transformers":
        model = _auto_class(info).from_pretrained(directory, **kwargs)
    elif fmt == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(_auto_class(info).from_pretrained(_checked_base(directory, info),
                                                                            **base_kwargs), directory)
    elif fmt == "delta":
        base = _auto_class(info).from_pretrained(_checked_base(directory, info), **base_kwargs)
        try:
            model = delta_format.apply_delta(base, directory)
        except (OSError, ValueError) as e:
            raise UserError(f"the delta in {directory} cannot be applied ({e}). Export the run again.") from None
    else:
        run_info = {**info, "model": {**info["model"], "name": _base_path(directory, info)}}
        run_info.pop("export")
        model = load_with_method(directory, run_info, trust_remote_code, EXPORT_REMEDY)
    return model.eval(), tokenizer, info


def load(path: str | Path, merge: bool = True, trust_remote_code: bool = False):
    """(model, tokenizer) ready for inference from a run directory, its final/, an export or a model directory.

    With ``merge`` (the default) a method that can be merged comes back as a plain model of the base architecture;
    MEFT comes back as peftkit built it (a transformers model whose encoder is the reversible stack)."""
    from peftkit.methods import create_method
    from peftkit.methods.trained import load_trained
    from peftkit.utils.output_paths import expand_path

    model, tokenizer, info = load_trained(expand_path(path, "path"), trust_remote_code)
    if merge and info.get("method"):
        method = create_method(info["method"], info.get("options", {}))
        fmt = (info.get("export") or {}).get("format")
        if method.can_merge and fmt in (None, "peft", "peftkit"):
            model = method.merge(model).eval()
    return model, tokenizer
