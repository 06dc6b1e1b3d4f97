"""Load a base model with its task head, and its tokenizer, failing fast when it cannot be found."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from peftkit.errors import UserError
from peftkit.models.aliases import ALIASES, resolve_model

HEAD_CLASSES = {
    "seq_cls": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
    "mlm": "AutoModelForMaskedLM",
}


def _check_reachable(name: str) -> None:
    """A name that is not a local path must come from the hub: fail in seconds when it cannot."""
    if Path(name).exists():
        return
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/") and name.count("/") > 1
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    reachable = False
    if not offline and not looks_local:
        try:
            with socket.create_connection(("huggingface.co", 443), timeout=3):
                reachable = True
        except OSError:
            reachable = False
    if not reachable:
        aliases = ", ".join(ALIASES)
        raise UserError(
            f'model "{name}" is not a local directory and the Hugging Face hub is not reachable'
            f"{' (HF_HUB_OFFLINE=1)' if offline else ''}. Set model.name to a local checkpoint directory "
            f"or to one of the offline aliases ({aliases})."
        )


def torch_dtype(name: str):
    import torch

    if name == "auto":
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return getattr(torch, name)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model(name)
    _check_reachable(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot load a tokenizer from "{name}" ({path}): {e}. Point model.name at a checkpoint that has one.') from None


def load_model(name: str, task_head: str = "seq_cls", num_labels: int | None = None, problem_type: str | None = None,
               dtype: str = "float32", trust_remote_code: bool = False, attn_implementation: str | None = None):
    """A transformers model with the requested head, from an alias, a local directory or the hub."""
    import transformers

    path = resolve_model(name)
    _check_reachable(path)
    auto = getattr(transformers, HEAD_CLASSES[task_head])
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if task_head == "seq_cls":
        kwargs["num_labels"] = num_labels
        kwargs["ignore_mismatched_sizes"] = True  # a checkpoint with another task's head gets a fresh head
        if problem_type:
            kwargs["problem_type"] = problem_type
    try:
        model = auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot load model "{name}" ({path}) with a {task_head} head: {e}') from None
    if task_head == "seq_cls" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id  # decoders need it to find the last token
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, each tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
