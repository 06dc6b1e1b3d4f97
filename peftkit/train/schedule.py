"""Learning-rate schedules: linear warmup, then linear / cosine decay to zero, or constant."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def make_scheduler(optimizer, total_steps: int, warmup_ratio: float, kind: str):
    from torch.optim.lr_scheduler import LambdaLR

    warmup = int(round(warmup_ratio * total_steps))
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, kind))
