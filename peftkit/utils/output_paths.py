"""Where results go: paths a user gave, with '~' and $VARS expanded."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_output_dir(text: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(text)))
