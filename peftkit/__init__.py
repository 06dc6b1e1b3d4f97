"""peftkit: parameter- and memory-efficient fine-tuning from YAML recipes.

Heavy libraries (torch, transformers, peft) are imported inside the functions that
need them so that ``peftkit --help`` and ``import peftkit`` stay fast.
"""

__version__ = "0.1.0"


def load(path, merge: bool = True, trust_remote_code: bool = False):
    """(model, tokenizer) ready for inference from a run directory, its final/, a ``peftkit export`` directory or a
    transformers model directory: ``model, tokenizer = peftkit.load("runs/pafi-sst2")``.

    With ``merge`` (the default) every method that can be merged comes back as a plain model of the base
    architecture; MEFT comes back as the reversible network peftkit trained."""
    import importlib

    # The package's public entry point forwards, by module name as the plugin registry does, to the artifacts layer
    # (peftkit.artifacts.load.load); nothing is imported before the call.
    return importlib.import_module("peftkit.artifacts.load").load(path, merge, trust_remote_code)
