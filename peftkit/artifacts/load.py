"""Load what a run produced, by one loader: a run directory, its final/, an export (``peftkit export``), a quantize
output directory, a peft adapter directory or a plain model.

A directory written by peftkit holds peftkit.json (:class:`peftkit.config.run_info.RunInfo`: base model, task,
method and its options); the base is loaded fresh and the method restores its own saved state onto it, always
through the method's ``load``. An export holds export.json and loads by its format. Anything else is a plain
checkpoint, loaded with the head the caller names (``plain_head``): the head is the caller's to know, a plain
checkpoint does not say which task it is for.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.config.run_info import INFO_FILE, RunInfo, read_run_info
from peftkit.errors import UserError

EXPORT_INFO_FILE = "export.json"  # what `peftkit export` writes (peftkit.artifacts.export)
FORMATS = ("transformers", "peft", "delta", "peftkit")
BASE_DIR = "base"
HEAD_CLASSES = {"seq_cls": "AutoModelForSequenceClassification", "causal_lm": "AutoModelForCausalLM",
                "mlm": "AutoModelForMaskedLM"}
RUN_REMEDY = ("Train the run again with peftkit finetune (with a lower train.lr if it diverged), or give another run "
              "directory.")
EXPORT_REMEDY = "Export the run again with peftkit export (or copy the export again, whole)."


def final_dir(path: str | Path) -> Path:
    p = Path(path)
    if (p / "final" / INFO_FILE).is_file():
        return p / "final"
    return p


def load_run(path: str | Path, trust_remote_code: bool = False, plain_head: str = "seq_cls", check=None):
    """(model in eval mode, tokenizer, run info or None) for a run directory, its final/, an export, or, with no
    peftkit record, a quantize output directory, a peft adapter directory or a plain checkpoint (None: nothing
    says what it was trained for). ``plain_head`` is the head a plain checkpoint is loaded with: ``seq_cls`` (a
    model directory whose config describes its head) or ``causal_lm`` (a language model: also an adapter directory,
    an alias or a hub id). Every weights file is checked before it is opened.

    ``check(run_info_or_None)`` sees what the directory records before any weights load (a task refusing a run it
    cannot score). Whether model code may run is the caller's decision (a flag the user gave), never the run
    directory's: its peftkit.json may say anything."""
    from peftkit.models.load import load_tokenizer

    check = check or (lambda info: None)
    directory = final_dir(path)
    if (directory / EXPORT_INFO_FILE).is_file():
        return load_export(directory, trust_remote_code, check)
    if (directory / INFO_FILE).is_file():
        info = read_run_info(directory / INFO_FILE)
        check(info)
        model = load_with_method(directory, info, trust_remote_code)
        return model.eval(), load_tokenizer(str(directory)), info
    check(None)
    if plain_head == "causal_lm":
        model, tokenizer = _load_language_model(path, directory)
        return model.eval(), tokenizer, None
    if not directory.exists():
        raise UserError(f"model directory {path} does not exist. Give a run directory (runs/<name>) or a checkpoint directory.")
    if not (directory / "config.json").is_file():
        raise UserError(f"{path} is neither a peftkit run (no final/{INFO_FILE}) nor a transformers checkpoint (no config.json).")
    from peftkit.models.load import load_model

    model = load_model(str(directory), plain_head)  # the head its config describes (num_labels, id2label)
    return model.eval(), load_tokenizer(str(directory)), None


def _load_language_model(name: str | Path, path: Path):
    """(model, tokenizer) of a causal LM without a peftkit record: a quantize output directory, a peft adapter
    directory (its base a quantize output or a model), a model directory, an alias or a hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.models.aliases import resolve_model
    from peftkit.models.load import check_adapter_dir
    from peftkit.quant.checkpoint import is_quantized_dir, load_adapter, load_quantized, load_quantized_base

    adapter_config = path / "adapter_config.json"
    if is_quantized_dir(path):
        model, tokenizer_dir = load_quantized(path), path
    elif adapter_config.is_file():
        from peft import PeftModel

        base_name = _read_json_object(adapter_config).get("base_model_name_or_path") or ""
        if is_quantized_dir(base_name):
            base, tokenizer_dir = load_quantized_base(base_name), Path(base_name)
            model = load_adapter(base, path)
        else:
            check_adapter_dir(path, f"the adapter in {path} cannot be loaded", RUN_REMEDY)
            _check_local_model(base_name)
            tokenizer_dir = Path(resolve_model(base_name))
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tokenizer_dir, dtype=torch.float32),
                                              str(path))
        if (path / "tokenizer_config.json").is_file():
            tokenizer_dir = path
    else:
        _check_local_model(str(name))
        tokenizer_dir = Path(resolve_model(str(name)))
        model = AutoModelForCausalLM.from_pretrained(tokenizer_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tokenizer_dir)


def load(path: str | Path, merge: bool = True, trust_remote_code: bool = False):
    """``peftkit.load``: (model, tokenizer) ready for inference from a run directory, its final/, an export or a
    model directory.

    With ``merge`` (the default) a method that can be merged comes back as a plain model of the base architecture;
    MEFT comes back as peftkit built it (a transformers model whose encoder is the reversible stack)."""
    from peftkit.methods import create_method
    from peftkit.utils.output_paths import expand_path

    model, tokenizer, info = load_run(expand_path(path, "path"), trust_remote_code)
    if merge and info is not None:
        method = create_method(info.method, info.options)
        fmt = (info.get("export") or {}).get("format")
        if method.can_merge and fmt in (None, "peft", "peftkit"):
            model = method.merge(model).eval()
    return model, tokenizer


# ---- a run's own saved state ------------------------------------------------------------------------------

def load_base_of(info: RunInfo, trust_remote_code: bool = False):
    """(method bound to its options, freshly loaded base model) of checked run metadata ``info``."""
    from peftkit.config.schema import ModelArgs
    from peftkit.methods import create_method
    from peftkit.models.load import load_model

    method = create_method(info.method, info.options)
    model_options = ModelArgs.model_validate({**info.model, "trust_remote_code": trust_remote_code})
    head = model_options.task_head
    base = method.load_base(model_options, head, info.num_labels, info.problem_type)
    if base is None:
        base = load_model(model_options.name, head, info.num_labels, info.problem_type, "float32",
                          model_options.trust_remote_code, model_options.attn_implementation)
    return method, base


def load_with_method(directory: Path, info: RunInfo, trust_remote_code: bool = False, remedy: str = RUN_REMEDY):
    """The base named by ``info`` with the method's saved state in ``directory`` restored onto it; every file of
    that state is checked (present, not a pickle, not truncated, finite) before the base loads."""
    from peftkit.methods import create_method

    create_method(info.method, info.options).check_saved(
        directory, f"the saved {info.method} state in {directory} cannot be loaded", remedy)
    method, base = load_base_of(info, trust_remote_code)
    try:
        return method.load(base, directory)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # a missing, truncated or foreign state file
        raise UserError(f"{directory} holds a {info.method} run whose saved state cannot be loaded ({e}). "
                        f"Re-create it with peftkit finetune, or point --model at another run.") from None


def _check_local_model(name: str) -> None:
    """A base or plain model that is a directory of this machine, checked before transformers opens it."""
    from peftkit.models.aliases import resolve_model
    from peftkit.models.load import check_model_dir

    path = Path(resolve_model(name))
    if name and path.is_dir():
        check_model_dir(path, name, any_model_type=True)


def _read_json_object(path: Path) -> dict:
    """A JSON object file (run metadata, an adapter config), or a UserError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e}). Re-create the directory it belongs to.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object. Re-create the directory it belongs to.")
    return data


# ---- exports ----------------------------------------------------------------------------------------------

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
    from peftkit.artifacts import delta
    from peftkit.methods import create_method
    from peftkit.models.load import check_model_dir, check_weights_file

    fmt, what = info["export"]["format"], f"the {info['export']['format']} export {directory} cannot be loaded"
    if fmt == "transformers":
        check_model_dir(directory, str(directory), any_model_type=True)
    elif fmt == "delta":
        check_weights_file(directory / delta.TENSORS, what, EXPORT_REMEDY)
    elif fmt == "peft":
        create_method(info["method"], info.get("options") or {}).check_saved(directory, what, EXPORT_REMEDY)
    # "peftkit": load_with_method checks the method's own files


def export_run_info(directory: Path, info: dict) -> RunInfo | None:
    """The run record an export carries (its export.json less nothing: the ``export`` section stays, as a key of
    the record), or None for an export of a plain checkpoint."""
    from pydantic import ValidationError

    if not info.get("method"):
        return None
    try:
        return RunInfo.model_validate(info)
    except ValidationError as e:
        raise UserError(f"{directory / EXPORT_INFO_FILE} does not describe a run ({e.error_count()} problem(s)). "
                        f"{EXPORT_REMEDY}") from None


def load_export(directory: str | Path, trust_remote_code: bool = False, check=None):
    """(model in eval mode, tokenizer, run info or None) of an export directory, each format by its own loader;
    every weights file is checked before it is opened (and ``check`` sees the run info first, as in load_run)."""
    import torch
    from transformers import AutoTokenizer

    directory = Path(directory)
    info = read_export_info(directory)
    fmt = info["export"]["format"]
    if fmt != "transformers" and not (isinstance(info.get("model"), dict) and info["model"].get("name")
                                      and info.get("method")):
        raise UserError(f"{directory / EXPORT_INFO_FILE} lacks the run's method or model. {EXPORT_REMEDY}")
    record = export_run_info(directory, info)
    if check is not None:
        check(record)
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
        from peftkit.artifacts import delta

        base = _auto_class(info).from_pretrained(_checked_base(directory, info), **base_kwargs)
        try:
            model = delta.apply_delta(base, directory)
        except (OSError, ValueError) as e:
            raise UserError(f"the delta in {directory} cannot be applied ({e}). Export the run again.") from None
    else:
        run_info = {**info, "model": {**info["model"], "name": _base_path(directory, info)}}
        run_info.pop("export")
        model = load_with_method(directory, RunInfo.model_validate(run_info), trust_remote_code, EXPORT_REMEDY)
    return model.eval(), tokenizer, record
