"""BERT-style corruption: pick prediction targets, then mask / replace / keep them (80/10/10).

A fraction ``mask_rate`` of the ordinary tokens of each row (never special tokens, never padding) becomes
prediction targets; the count per row is ``floor(mask_rate * eligible + u)``, u ~ U(0, 1) (unbiased
rounding, as fairseq's RoBERTa does). Each target independently becomes
  [MASK]            with probability replace_probs[0]  -> ``removed``: 3ML drops these from the early layers
  a random token    with probability replace_probs[1]  -> stays in the encoder input
  itself            with probability replace_probs[2]  -> stays in the encoder input
The loss is computed on the targets only (labels = -100 elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

IGNORE_INDEX = -100


@dataclass
class Corruption:
    input_ids: "torch.Tensor"  # (B, n) corrupted ids; removed slots hold the [MASK] id
    labels: "torch.Tensor"  # (B, n) original id at targets, -100 elsewhere
    removed: "torch.Tensor"  # (B, n) bool: targets that became [MASK]
    attention_mask: "torch.Tensor"  # (B, n) 1 = real token, 0 = padding

    def as_batch(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "labels": self.labels, "removed": self.removed}


def corrupt(input_ids, attention_mask, special_ids: Sequence[int], mask_token_id: int, vocab_size: int,
            mask_rate: float, replace_probs: Sequence[float] = (0.8, 0.1, 0.1), generator=None) -> Corruption:
    """Corrupt a batch of token ids (see the module docstring). ``generator`` None = torch's global RNG."""
    import torch

    device = input_ids.device
    specials = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype, device=device)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, specials)

    # targets: the `count` eligible positions with the smallest random scores in each row
    scores = torch.rand(input_ids.shape, generator=generator, device=device)
    scores = scores.masked_fill(~eligible, 2.0)  # ineligible positions sort last
    ranks = scores.argsort(dim=1).argsort(dim=1)
    jitter = torch.rand(input_ids.shape[0], generator=generator, device=device)
    count = (mask_rate * eligible.sum(dim=1) + jitter).floor().long()
    targets = (ranks < count[:, None]) & eligible

    # what each target becomes
    p_mask, p_random, _ = replace_probs
    u = torch.rand(input_ids.shape, generator=generator, device=device)
    removed = targets & (u < p_mask)
    randomized = targets & (u >= p_mask) & (u < p_mask + p_random)

    # random replacements are ordinary tokens (never <s>, </s>, <pad>, <mask>)
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[specials[specials < vocab_size]] = False
    allowed[mask_token_id] = False
    allowed_ids = allowed.nonzero().squeeze(1)
    pick = torch.randint(len(allowed_ids), input_ids.shape, generator=generator, device=device)

    corrupted = input_ids.clone()
    corrupted[randomized] = allowed_ids[pick[randomized]].to(input_ids.dtype)
    corrupted[removed] = mask_token_id
    labels = torch.where(targets, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return Corruption(corrupted, labels, removed, attention_mask.long())


class MaskingCollator:
    """collate_fn: stack (padded) token blocks and corrupt them with torch's global RNG.

    Using the global RNG (not a private generator) lets the trainer's checkpoints, which store that RNG,
    resume to exactly the same corruption sequence.
    """

    def __init__(self, pad_id: int, special_ids: Sequence[int], mask_token_id: int, vocab_size: int,
                 mask_rate: float, replace_probs: Sequence[float] = (0.8, 0.1, 0.1)):
        self.pad_id, self.special_ids, self.mask_token_id = pad_id, list(special_ids), mask_token_id
        self.vocab_size, self.mask_rate, self.replace_probs = vocab_size, mask_rate, tuple(replace_probs)

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            attention[i, :n] = 1
        return corrupt(ids, attention, self.special_ids, self.mask_token_id, self.vocab_size, self.mask_rate,
                       self.replace_probs).as_batch()
