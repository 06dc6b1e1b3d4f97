"""Shared builders for the pretraining tests: a tiny eager RoBERTa and a corrupted batch with padding."""

from __future__ import annotations

import torch

MASK_ID = 4
SPECIAL_IDS = [0, 1, 2, 3, 4]  # <s>, <pad>, </s>, <unk>, <mask>


def tiny_config(layers: int = 3):
    from peftkit.pretrain.presets import roberta_config

    return roberta_config("tiny", attn_implementation="eager", num_hidden_layers=layers)


def token_batch(rows: int = 3, length: int = 24, seed: int = 0, pad_last_rows: bool = True):
    """Random ordinary tokens framed by <s> ... </s>; later rows are shorter (right padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (rows, length), generator=g)
    attention = torch.ones_like(ids)
    for r in range(rows):
        n = length - (3 * (r % 4) if pad_last_rows else 0)
        ids[r, 0], ids[r, n - 1] = 0, 2
        ids[r, n:], attention[r, n:] = 1, 0
    return ids, attention


def corrupted(rows=3, length=24, mask_rate=0.5, seed=0):
    from peftkit.pretrain.corruption import corrupt

    ids, attention = token_batch(rows, length, seed)
    g = torch.Generator().manual_seed(seed + 1)
    return ids, corrupt(ids, attention, SPECIAL_IDS, MASK_ID, 64, mask_rate, generator=g)
