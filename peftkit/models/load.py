"""Load a base model with its task head, and its tokenizer, failing fast when it cannot be found.

A local model directory is checked before transformers sees it (``check_model_dir``): config.json must be
a JSON object naming a model_type peftkit supports, and the weights must be safetensors whose headers fit
their files, every floating tensor finite. Pickle weights (pytorch_model.bin) are refused rather than loaded:
unpickling runs code chosen by whoever wrote the file.

``check_weights_file`` is the same check for one file of any other kind peftkit loads (a run's saved state, an
adapter, a delta, a quantized base): every weights file is checked with it, or with ``check_model_dir``, before
anything opens it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from peftkit.errors import UserError
from peftkit.models.aliases import ALIASES, resolve_model
from peftkit.models.families import FAMILIES
from peftkit.utils.safetensors_header import check_safetensors_file

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"}
# (resolved path, size, mtime) -> the first non-finite tensor or None: a base model loaded again in one process
# (a bench, an export) is read once; a rewritten file has another size or mtime and is read again.
_FINITE_CHECKED: dict[tuple[str, int, int], str | None] = {}


def _model_error(name: str, problem: str, expected: str) -> UserError:
    return UserError(f'cannot load model "{name}": {problem}. {expected}')


def read_model_config(directory: Path, name: str | None = None) -> dict:
    """config.json of a model directory as a dict with a string model_type; a UserError naming the file otherwise."""
    name = name or str(directory)
    path = Path(directory) / "config.json"
    expected = ("A model directory needs a transformers config.json: a JSON object with model_type "
                "(as save_pretrained writes it).")
    if not path.is_file():
        raise _model_error(name, f"{path} does not exist", expected)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _model_error(name, f"{path} is not valid JSON ({e})", expected) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise _model_error(name, f"{path} has no model_type", expected)
    return config


def nonfinite_tensor(path: Path) -> str | None:
    """The name of the first floating tensor of the safetensors file ``path`` holding a NaN or an infinity, else None.

    One pass per floating tensor, one tensor in memory at a time; integer tensors (packed codes, indices) are not
    read. ``path`` must have passed check_safetensors_file.
    """
    import torch
    from safetensors import safe_open

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _FINITE_CHECKED:
        return _FINITE_CHECKED[key]
    found = None
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            if f.get_slice(name).get_dtype() not in _FLOAT_DTYPES:
                continue
            tensor = f.get_tensor(name)
            if tensor.element_size() == 1:  # float8: arithmetic is not defined for it on every build
                tensor = tensor.float()
            # x * 0 is exactly 0 for a finite x and NaN for a NaN or an infinity, so the sum is 0 or NaN (never an
            # overflow); four times cheaper than isfinite(x).all(), which builds a bool tensor and reduces it again.
            if not bool(torch.isfinite((tensor * 0).sum())):
                found = name
                break
    _FINITE_CHECKED[key] = found
    return found


def _pickles_instead_of(path: Path) -> list[Path]:
    """Pickle files beside ``path`` that a loader would fall back to when ``path`` (safetensors) is missing."""
    twins = [path.with_suffix(s) for s in PICKLE_SUFFIXES]
    if path.name == SAFE_WEIGHTS:
        twins += [path.with_name(n) for n in PICKLE_WEIGHTS]
    return [p for p in twins if p.exists()]


def check_weights_file(path: str | Path, what: str, remedy: str) -> None:
    """Check one weights file before anything opens it; a UserError of one paragraph otherwise.

    ``what`` names what the file is (e.g. "the saved lora state of run X") and starts the message; ``remedy`` ends
    it. Refused: a missing file (naming a pickle found in its place, which is never unpickled), a pickle file, a
    safetensors file whose header does not fit its size (truncated, overwritten), and a floating tensor holding
    NaN or infinite values (named).
    """
    path = Path(path)
    if not path.is_file():
        pickled = _pickles_instead_of(path)
        if pickled:
            raise UserError(f"{what}: {path} does not exist and {pickled[0]} stands in its place, a pickle file, which "
                            f"peftkit does not open (unpickling can run arbitrary code). Where you trust that file, "
                            f"convert it once: python -c \"import torch; from safetensors.torch import save_file; "
                            f"save_file(torch.load('{pickled[0]}', weights_only=True), '{path}')\". Otherwise: {remedy}")
        raise UserError(f"{what}: {path} does not exist. {remedy}")
    if path.suffix in PICKLE_SUFFIXES:
        raise UserError(f"{what}: {path} is a pickle file, which peftkit does not open (unpickling can run arbitrary "
                        f"code); it reads safetensors files only. {remedy}")
    try:
        check_safetensors_file(path)
        bad = nonfinite_tensor(path)
    except Exception as e:  # OSError, ValueError, or what safetensors itself says of a header it cannot use
        raise UserError(f"{what}: {path} is not a valid safetensors file ({e}); it is truncated or damaged. "
                        f"{remedy}") from None
    if bad is not None:
        raise UserError(f"{what}: the tensor {bad!r} in {path} holds NaN or infinite values, so every output computed "
                        f"from it would be NaN or meaningless. {remedy}")


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft would fall back to adapter_model.bin, a pickle: never reached


def check_adapter_dir(directory: str | Path, what: str, remedy: str) -> None:
    """A peft adapter directory, checked before peft opens it: its config present, its weights as check_weights_file
    wants them."""
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise UserError(f"{what}: {directory / ADAPTER_CONFIG} does not exist. {remedy}")
    check_weights_file(directory / ADAPTER_WEIGHTS, what, remedy)


def _weight_files(directory: Path, name: str) -> list[Path]:
    index = directory / SAFE_INDEX
    if (directory / SAFE_WEIGHTS).is_file():
        return [directory / SAFE_WEIGHTS]
    if not index.is_file():
        return []
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
        bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s or s in ("", ".", "..")]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _model_error(name, f"{index} is not a valid shard index ({e})",
                           "Expected JSON with a weight_map of tensor name -> shard file name.") from None
    if bad or not shards:
        raise _model_error(name, f"{index} names shard files outside the directory or none at all ({bad})",
                           "Each shard must be a plain file name inside the model directory.")
    return [directory / s for s in sorted(shards)]


def check_model_dir(directory: str | Path, name: str | None = None, need_weights: bool = True,
                    any_model_type: bool = False) -> dict:
    """Check a local model directory before any loader touches it; return its config.json.

    One UserError, naming the file and what is expected, for: a missing or malformed config.json, a
    model_type outside peftkit.models.families (unless ``any_model_type``: a model only run, never trained, by
    transformers' own code), pickle-only weights, no weights, safetensors files that are truncated or whose header
    does not parse, and a floating tensor holding NaN or infinite values.
    """
    directory = Path(directory)
    name = name or str(directory)
    config = read_model_config(directory, name)
    if config["model_type"] not in FAMILIES and not any_model_type:
        # a family outside the tested ones is read from its structure like any other; only one whose structure
        # cannot be read (an encoder-decoder, no list of identical blocks, a type transformers does not know) is refused
        from peftkit.models.families import family_of_config

        try:
            family_of_config(config)
        except Exception as e:  # noqa: BLE001 - whatever stops transformers from building it: the reason is shown
            raise _model_error(name, f"{directory / 'config.json'} has model_type {config['model_type']!r}, which "
                                     f"peftkit does not support: {e}",
                               f"Supported model types: {', '.join(FAMILIES)} (tested in the suite), and others "
                               f"whose blocks peftkit can read from the model.") from None
    if not need_weights:
        return config
    files = _weight_files(directory, name)
    if not files:
        pickled = [n for n in PICKLE_WEIGHTS if (directory / n).exists()]
        if pickled:
            raise _model_error(
                name, f"its weights are only in {directory / pickled[0]}, a pickle file, which peftkit does not load "
                      f"(unpickling can run arbitrary code)",
                f"Convert it once, where you trust the file, with transformers: "
                f"`AutoModel.from_pretrained('{directory}').save_pretrained('{directory}', safe_serialization=True)` "
                f"writes {SAFE_WEIGHTS} beside it.")
        raise _model_error(name, f"{directory} holds no weights",
                           f"Expected {SAFE_WEIGHTS} (or a sharded {SAFE_INDEX} with its shards), as save_pretrained "
                           f"writes them.")
    for f in files:
        if not f.is_file():
            raise _model_error(name, f"the shard {f} named in {SAFE_INDEX} does not exist",
                               "Copy the complete model directory again.")
        try:
            check_safetensors_file(f)
            bad = nonfinite_tensor(f)
        except Exception as e:  # OSError, ValueError, or what safetensors itself says of a header it cannot use
            raise _model_error(name, f"{f} is not a valid safetensors file ({e})",
                               "The file is damaged or incomplete; copy or download it again.") from None
        if bad is not None:
            raise _model_error(name, f"the tensor {bad!r} in {f} holds NaN or infinite values",
                               "Every output computed from it would be NaN or meaningless. Use weights saved before "
                               "the values went bad (an earlier checkpoint or the original download), or train again "
                               "with a lower learning rate.")
    return config

HEAD_CLASSES = {
    "seq_cls": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
    "mlm": "AutoModelForMaskedLM",
}


def locate(name: str) -> str:
    """Where a model is read from: a local path as it is; a hub id from the local Hugging Face cache (huggingface_hub's
    own lookup, no network), else unchanged for transformers to download, unless HF_HUB_OFFLINE=1 forbids it."""
    if Path(name).exists():
        return name
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/") and name.count("/") > 1
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if not looks_local:
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(name, local_files_only=True)
        except Exception:  # not cached (or not a valid hub id): decided below
            pass
    if looks_local or offline:
        aliases = ", ".join(ALIASES)
        where = "is not a local directory" if looks_local else (
            "is neither a local directory nor in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it")
        raise UserError(f'model "{name}" {where}. Set model.name to a local checkpoint directory, a hub id present in '
                        f"the cache (HF_HUB_CACHE), or one of the offline aliases ({aliases}).")
    return name


def torch_dtype(name: str):
    import torch

    if name == "auto":
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return getattr(torch, name)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = locate(resolve_model(name))
    if (Path(path) / "config.json").exists():  # a tokenizer directory may lack one; a broken one is still an error
        read_model_config(Path(path), name)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot load a tokenizer from "{name}" ({path}): {e}. Point model.name at a checkpoint that has one.') from None


def load_model(name: str, task_head: str = "seq_cls", num_labels: int | None = None, problem_type: str | None = None,
               dtype: str = "float32", trust_remote_code: bool = False, attn_implementation: str | None = None):
    """A transformers model with the requested head, from an alias, a local directory or the hub."""
    import transformers

    path = locate(resolve_model(name))
    if Path(path).is_dir():
        check_model_dir(path, name)
    elif Path(path).exists():
        raise _model_error(name, f"{path} is a file", "Set model.name to a model directory (holding config.json and "
                                                      "model.safetensors), an alias or a hub name.")
    auto = getattr(transformers, HEAD_CLASSES[task_head])
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if task_head == "seq_cls":
        if num_labels is not None:  # None: the head the checkpoint's config describes
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
