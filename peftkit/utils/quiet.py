"""Keep library chatter (load reports, progress bars of weight loading, optional-kernel notices) off the console."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Call before importing transformers/peft: errors still show, routine notices do not."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
