"""Keep library chatter (load reports, progress bars of weight loading, optional-kernel notices) off the console."""

from __future__ import annotations

import logging
import os
import warnings

# Loggers whose routine notices reach every LoRA run: peft's LoRA dispatch imports GPT-QModel and transformers imports
# torchao whenever they are installed, quantized base or not. torchao then logs "Failed to load <kernel>.so" for the
# CUDA kernels a CPU build cannot load, and the torch.compile registrations it makes log pytree deprecation notices.
# Errors still show.
NOISY_LOGGERS = ("bitsandbytes", "torchao", "torch.utils._pytree")


def quiet_libraries() -> None:
    """Call before importing transformers/peft: errors still show, routine notices do not."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # GPT-QModel prints a banner and environment notices through its "logbar" logger while it is imported, and sets
    # that logger to INFO as it creates it, so a level set here would not last; the logger is switched off instead.
    # GPT-QModel's failures are exceptions, which still reach the user.
    logging.getLogger("logbar").disabled = True
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
