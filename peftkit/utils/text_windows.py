"""Plain text as token windows: calibration for quantization, causal-LM training and perplexity.

WikiText-2 files are read from a local directory (data.root, else env PEFTKIT_WIKITEXT: peftkit.paths):
wiki.test.raw for perplexity, wiki.valid.tokens for calibration and training.
"""

from __future__ import annotations

import os
from pathlib import Path

from peftkit.errors import UserError
from peftkit.paths import WIKITEXT_TEST, WIKITEXT_TRAIN

TEST_FILE = WIKITEXT_TEST
TRAIN_FILE = WIKITEXT_TRAIN


def read_text(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"WikiText-2 file {path} does not exist; set env PEFTKIT_WIKITEXT (or data_root) to the directory holding it.")
    return path.read_text(encoding="utf-8")


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one token sequence, without special tokens (no BOS inside the stream)."""
    import torch

    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def consecutive_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None, skip: int = 0) -> torch.Tensor:
    """Non-overlapping windows (n, seq_len) from the start of the stream, after ``skip`` windows."""
    n = ids.numel() // seq_len - skip
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise UserError(f"the text has {ids.numel()} tokens: not enough for {skip + 1} window(s) of {seq_len}; lower seq_len.")
    return ids[skip * seq_len:(skip + n) * seq_len].reshape(n, seq_len)


def random_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens at random positions (seeded)."""
    if ids.numel() <= seq_len:
        raise UserError(f"the calibration text has {ids.numel()} tokens, fewer than seq_len {seq_len}.")
    import torch

    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
