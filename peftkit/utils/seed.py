"""Seeding for reproducible runs."""

from __future__ import annotations

import random


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) random generators with ``seed``.

    Model initialisation (e.g. a new classification head), data order and dropout all draw from these,
    so two runs of the same recipe with the same seed on the same machine give the same weights.
    """
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
