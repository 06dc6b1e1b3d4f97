"""Corruption: p of the ordinary tokens become targets (never specials or padding), split 80/10/10."""

import pytest
import torch
from helpers.pretrain import MASK_ID, SPECIAL_IDS, token_batch

from peftkit.pretrain.corruption import MaskingCollator, corrupt


@pytest.mark.parametrize("mask_rate", [0.15, 0.5])
def test_target_rate_and_80_10_10_split(mask_rate):
    ids, attention = token_batch(rows=200, length=128, seed=1)
    g = torch.Generator().manual_seed(0)
    out = corrupt(ids, attention, SPECIAL_IDS, MASK_ID, 64, mask_rate, generator=g)
    eligible = attention.bool() & (ids > 4)
    targets = out.labels != -100

    assert not (targets & ~eligible).any()  # never <s>, </s>, padding
    assert (out.input_ids[~targets] == ids[~targets]).all()  # non-targets untouched
    assert torch.equal(out.labels[targets], ids[targets])
    # per-row count is floor(p * eligible + u): within one of p * eligible, and p on average
    per_row = targets.sum(1).float()
    assert ((per_row - mask_rate * eligible.sum(1)).abs() <= 1).all()
    assert targets.sum() / eligible.sum() == pytest.approx(mask_rate, abs=0.005)

    n = targets.sum().item()
    masked = out.removed
    assert (out.input_ids[masked] == MASK_ID).all() and not (masked & ~targets).any()
    changed = targets & ~masked & (out.input_ids != ids)
    kept = targets & ~masked & (out.input_ids == ids)
    tol = 4 * (0.1 * 0.9 / n) ** 0.5  # four standard deviations
    assert masked.sum().item() / n == pytest.approx(0.8, abs=4 * (0.16 / n) ** 0.5)
    # a random token equals the original with probability 1/59, so a few "random" ones look unchanged
    assert changed.sum().item() / n == pytest.approx(0.1 * 58 / 59, abs=tol)
    assert kept.sum().item() / n == pytest.approx(0.1 + 0.1 / 59, abs=tol)
    random_ids = out.input_ids[changed]
    assert not torch.isin(random_ids, torch.tensor(SPECIAL_IDS)).any()


def test_mask_rate_zero_corrupts_nothing():
    ids, attention = token_batch(rows=8, length=32)
    out = corrupt(ids, attention, SPECIAL_IDS, MASK_ID, 64, 0.0)
    assert torch.equal(out.input_ids, ids) and (out.labels == -100).all() and not out.removed.any()


def test_collator_pads_uneven_blocks_and_corrupts():
    collate = MaskingCollator(pad_id=1, special_ids=SPECIAL_IDS, mask_token_id=MASK_ID, vocab_size=64, mask_rate=0.5)
    torch.manual_seed(0)
    batch = collate([{"input_ids": [0, 7, 8, 9, 10, 11, 2]}, {"input_ids": [0, 12, 13, 2]}])
    assert batch["input_ids"].shape == (2, 7)
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]
    assert (batch["input_ids"][1, 4:] == 1).all()
    assert (batch["labels"] != -100).sum(1).tolist()[0] in (2, 3)  # 5 ordinary tokens at p = 0.5
    assert set(batch) == {"input_ids", "attention_mask", "labels", "removed"}
