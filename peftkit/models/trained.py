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


def final_dir(path: str | Path) -> Path:
    p = Path(path)
    if (p / "final" / INFO_FILE).is_file():
        return p / "final"
    return p


def load_trained(path: str | Path):
    """(model in eval mode, tokenizer, info dict) for a run directory, its final/ or a checkpoint directory."""
    from peftkit.config.schema import ModelOptions
    from peftkit.methods import get_method
    from peftkit.models.load import load_model, load_tokenizer

    directory = final_dir(path)
    info_path = directory / INFO_FILE
    if not directory.exists():
        raise UserError(f"model directory {path} does not exist. Give a run directory (runs/<name>) or a checkpoint directory.")
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        method = get_method(info["method"])
        options = method.Options(**info.get("options", {}))
        model_options = ModelOptions(**info["model"])
        head = model_options.task_head
        base = method.load_base(model_options, head, info.get("num_labels"), info.get("problem_type"))
        if base is None:
            base = load_model(model_options.name, head, info.get("num_labels"), info.get("problem_type"), "float32",
                              model_options.trust_remote_code, model_options.attn_implementation)
        model = method.load(base, directory, options)
        tokenizer = load_tokenizer(str(directory))
    elif (directory / "config.json").is_file():
        info = {}
        model = load_model(str(directory), "seq_cls")
        tokenizer = load_tokenizer(str(directory))
    else:
        raise UserError(f"{path} is neither a peftkit run (no final/{INFO_FILE}) nor a transformers checkpoint (no config.json).")
    return model.eval(), tokenizer, info
