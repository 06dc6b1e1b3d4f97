"""Method registry: name -> plugin, imported only when used (keeps --help fast)."""

from __future__ import annotations

import importlib

from peftkit.errors import UserError, did_you_mean

# name: (module, class, one-line description)
METHODS: dict[str, tuple[str, str, str]] = {
    "full": ("peftkit.methods.full", "FullFineTuning", "Full fine-tuning: every parameter trains."),
    "lora": ("peftkit.methods.lora", "LoRA", "LoRA through peft; the task head trains and is saved with the adapter."),
    "bitfit": ("peftkit.methods.bitfit", "BitFit", "BitFit: only bias terms (and the task head) train."),
    "pafi": ("peftkit.methods.pafi", "PaFi", "PaFi: sparse fine-tuning of the smallest-magnitude pretrained weights."),
    "hiwi": ("peftkit.methods.hiwi", "HiWi", "HiWi: adapter applied to FFN weights/biases, merged away (no latency)."),
    "supertuning": ("peftkit.methods.supertuning", "SuperTuning", "peft's magnitude-selected sparse tuner (a PaFi peer)."),
    "meft1": ("peftkit.methods.meft", "MEFT1", "MEFT1 (reversible): F = pretrained layer, G = adapter, lambda 0.1."),
    "meft2": ("peftkit.methods.meft", "MEFT2", "MEFT2 (reversible): F = adapter, G = pretrained layer, beta 0.1."),
    "meft3": ("peftkit.methods.meft", "MEFT3", "MEFT3 (reversible): F = attention, G = FFN, lambda = beta = 0.1."),
    "apiq": ("peftkit.methods.quantized_lora", "QuantizedLoRA", "LoRA on a quantized base made by `peftkit quantize`."),
}
BUILT_BY_ISSUE = {"pafi": 3, "hiwi": 3, "supertuning": 3, "meft1": 4, "meft2": 4, "meft3": 4, "apiq": 5}


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str):
    """Return an instance of the plugin registered as ``name``; UserError with a suggestion otherwise."""
    if name not in METHODS:
        raise UserError(f'unknown method "{name}"{did_you_mean(name, METHODS)}. Run `peftkit methods` for the list.')
    module, cls, description = METHODS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        issue = BUILT_BY_ISSUE.get(name)
        raise UserError(
            f'method "{name}" ({description}) is not built yet in this version of peftkit'
            + (f" (planned in issue {issue})" if issue else "")
            + f". Built methods: {', '.join(available_methods())}."
        ) from None
    return getattr(mod, cls)()


def available_methods() -> list[str]:
    """Registered methods whose module is present (no import: a file check)."""
    import importlib.util

    return [n for n, (m, _, _) in METHODS.items() if importlib.util.find_spec(m) is not None]
