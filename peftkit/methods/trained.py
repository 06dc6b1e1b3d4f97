"""Load what a run produced: <run>/final (or the directory itself) back into a model for evaluation.

A directory written by peftkit holds peftkit.json (base model, task, method and its options); the
base is loaded fresh and the method restores its own saved state onto it. Any other directory is
treated as a plain transformers checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.errors import UserError

INFO_FILE = "peftkit.json"
EXPORT_INFO_FILE = "export.json"  # what `peftkit export` writes (peftkit.methods.export)
RUN_REMEDY = ("Train the run again with peftkit finetune (with a lower train.lr if it diverged), or give another run "
              "directory.")


def final_dir(path: str | Path) -> Path:
    p = Path(path)
    if (p / "final" / INFO_FILE).is_file():
        return p / "final"
    return p


def read_run_info(path: Path) -> dict:
    """peftkit.json of a finished run, checked: a method name, its options and the model section, or one clear error."""
    from pydantic import ValidationError

    from peftkit.config.schema import ModelArgs
    from peftkit.utils.registry import METHODS

    expected = ('a JSON object with "method" (a method name), "options" (an object) and "model" (an object with '
                '"name" and "task_head"), as peftkit finetune writes it')
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e}); expected {expected}.") from None
    if not (isinstance(info, dict) and isinstance(info.get("method"), str) and isinstance(info.get("options", {}), dict)
            and isinstance(info.get("model"), dict)):
        raise UserError(f"{path} is not peftkit run metadata; expected {expected}.")
    if info["method"] not in METHODS:
        raise UserError(f"{path} names the method {info['method']!r}, which this peftkit does not have "
                        f"(known: {', '.join(METHODS.names())}).")
    try:
        ModelArgs.model_validate(info["model"])
    except ValidationError as e:
        raise UserError(f"{path}: its model section is not valid ({e.error_count()} problem(s)); expected {expected}.") from None
    info.setdefault("options", {})
    return info


def load_trained(path: str | Path, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer, info dict) for a run directory, its final/, a checkpoint directory or an
    export (``peftkit export``).

    Whether model code may run is the caller's decision (a flag the user gave), never the run directory's:
    its peftkit.json may say anything."""
    from peftkit.models.load import load_model, load_tokenizer

    directory = final_dir(path)
    info_path = directory / INFO_FILE
    if not directory.exists():
        raise UserError(f"model directory {path} does not exist. Give a run directory (runs/<name>) or a checkpoint directory.")
    if (directory / EXPORT_INFO_FILE).is_file():
        from peftkit.methods.export import load_export

        return load_export(directory, trust_remote_code)
    if info_path.is_file():
        info = read_run_info(info_path)
        model = load_with_method(directory, info, trust_remote_code)
        tokenizer = load_tokenizer(str(directory))
    elif (directory / "config.json").is_file():
        info = {}
        model = load_model(str(directory), "seq_cls")  # the head its config describes (num_labels, id2label)
        tokenizer = load_tokenizer(str(directory))
    else:
        raise UserError(f"{path} is neither a peftkit run (no final/{INFO_FILE}) nor a transformers checkpoint (no config.json).")
    return model.eval(), tokenizer, info


def check_head_fits(model, task, model_dir) -> None:
    """A checkpoint that does not record its task (a plain transformers one) against the GLUE ``task`` asked for: its
    head must have the task's number of outputs (1 = a regression score), or its scores would be meaningless."""
    outputs = getattr(model.config, "num_labels", None)
    if outputs == task.num_labels:
        return
    needs = "1 output (a regression score)" if task.num_labels == 1 else f"{task.num_labels} outputs (one per class)"
    labels = getattr(model.config, "id2label", None) or {}
    has = f"{outputs} output(s)" + (f" ({', '.join(str(v) for v in labels.values())})" if labels else "")
    raise UserError(f"{model_dir} is a checkpoint without peftkit metadata whose classification head has {has}, and "
                    f"{task.name} needs {needs}: its head does not fit {task.name}. Evaluate it on a task with "
                    f"{outputs} output(s), or fine-tune it for {task.name} with peftkit finetune first.")


def load_base_of(info: dict, trust_remote_code: bool = False):
    """(method bound to its options, freshly loaded base model) of checked run metadata ``info``."""
    from peftkit.config.schema import ModelArgs
    from peftkit.methods import create_method
    from peftkit.models.load import load_model

    method = create_method(info["method"], info["options"])
    model_options = ModelArgs.model_validate({**info["model"], "trust_remote_code": trust_remote_code})
    head = model_options.task_head
    base = method.load_base(model_options, head, info.get("num_labels"), info.get("problem_type"))
    if base is None:
        base = load_model(model_options.name, head, info.get("num_labels"), info.get("problem_type"), "float32",
                          model_options.trust_remote_code, model_options.attn_implementation)
    return method, base


def load_with_method(directory: Path, info: dict, trust_remote_code: bool = False, remedy: str = RUN_REMEDY):
    """The base named by ``info`` with the method's saved state in ``directory`` restored onto it; every file of
    that state is checked (present, not a pickle, not truncated, finite) before the base loads."""
    from peftkit.methods import create_method

    create_method(info["method"], info["options"]).check_saved(
        directory, f"the saved {info['method']} state in {directory} cannot be loaded", remedy)
    method, base = load_base_of(info, trust_remote_code)
    try:
        return method.load(base, directory)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # a missing, truncated or foreign state file
        raise UserError(f"{directory} holds a {info['method']} run whose saved state cannot be loaded ({e}). "
                        f"Re-create it with peftkit finetune, or point --model at another run.") from None


def _check_local_model(name: str) -> None:
    """A base or plain model that is a directory of this machine, checked before transformers opens it."""
    from peftkit.models.aliases import resolve_model
    from peftkit.models.load import check_model_dir

    path = Path(resolve_model(name))
    if name and path.is_dir():
        check_model_dir(path, name, any_model_type=True)


def load_for_eval(model_path_or_dir: str):
    """(model, tokenizer) from a quantize output dir (quantized base + LoRA), a peft adapter dir whose
    base is one of these (e.g. a fine-tuned apiq run), an export, a model dir or an alias. A `peftkit finetune` run
    directory stands for its final/ (lora and apiq runs store a peft adapter there, full runs a model dir, MEFT
    runs their adapters in peftkit's format). Every weights file is checked before it is opened."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.models.aliases import resolve_model
    from peftkit.models.load import check_adapter_dir
    from peftkit.quant.checkpoint import (
        is_quantized_dir,
        load_adapter,
        load_quantized,
        load_quantized_base,
    )

    path = final_dir(model_path_or_dir)
    described = path / INFO_FILE if (path / INFO_FILE).is_file() else path / EXPORT_INFO_FILE
    if described.is_file():
        head = (_read_json_object(described).get("model") or {}).get("task_head")
        if head != "causal_lm" and not (described.name == EXPORT_INFO_FILE and head is None):  # None: a plain model
            raise UserError(f"{model_path_or_dir} was fine-tuned with a {head} head; perplexity needs a causal LM "
                            f"(a run with data.task wikitext2, a quantize output directory or a language model).")
    adapter_config = path / "adapter_config.json"
    what = f"the adapter in {path} cannot be loaded"
    if (path / EXPORT_INFO_FILE).is_file():
        from peftkit.methods.export import load_export

        model, tokenizer, _ = load_export(path)
        return (model.cuda() if torch.cuda.is_available() else model).eval(), tokenizer
    if is_quantized_dir(path):
        model, tokenizer_dir = load_quantized(path), path
    elif adapter_config.is_file():
        from peft import PeftModel

        base_name = _read_json_object(adapter_config).get("base_model_name_or_path") or ""
        if is_quantized_dir(base_name):
            base, tokenizer_dir = load_quantized_base(base_name), Path(base_name)
            model = load_adapter(base, path)
        else:
            check_adapter_dir(path, what, RUN_REMEDY)
            _check_local_model(base_name)
            tokenizer_dir = Path(resolve_model(base_name))
            base = AutoModelForCausalLM.from_pretrained(tokenizer_dir, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, str(path))
        if (path / "tokenizer_config.json").is_file():
            tokenizer_dir = path
    elif (path / INFO_FILE).is_file() and not (path / "config.json").is_file():  # a method's own format (MEFT)
        model, tokenizer_dir = load_with_method(path, read_run_info(path / INFO_FILE)), path
    else:
        name = str(path) if (path / INFO_FILE).is_file() else str(model_path_or_dir)
        _check_local_model(name)
        tokenizer_dir = Path(resolve_model(name))
        model = AutoModelForCausalLM.from_pretrained(tokenizer_dir, dtype=torch.float32)
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval(), AutoTokenizer.from_pretrained(tokenizer_dir)


def _read_json_object(path: Path) -> dict:
    """A JSON object file (run metadata, an adapter config), or a UserError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e}). Re-create the directory it belongs to.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object. Re-create the directory it belongs to.")
    return data
