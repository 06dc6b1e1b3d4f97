"""The pretraining tokenizer: a local tokenizer directory, or a byte-level BPE trained on the corpus.

A trained tokenizer is cached under <cache>/tokenizers/bpe-<hash of files and vocab size> (so the
variants of an equal-compute comparison share one vocabulary) and saved into every exported checkpoint.
Special tokens follow RoBERTa: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from peftkit.errors import UserError

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _fingerprint(paths: list[Path], vocab_size: int) -> str:
    h = hashlib.sha256(f"bytelevel-bpe v1 {vocab_size}".encode())
    for p in paths:
        stat = p.stat()
        h.update(f"{p.resolve()} {stat.st_size} {int(stat.st_mtime)}".encode())
    return h.hexdigest()[:16]


def train_bpe(paths: list[Path], vocab_size: int, out_dir: Path):
    """Train a byte-level BPE on the corpus and save it as a RobertaTokenizer in ``out_dir``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    from peftkit.pretrain.corpus import iter_corpus

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(iter_corpus(paths), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = RobertaTokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def load_tokenizer(source: str, paths: list[Path], vocab_size: int, cache_root: Path | None = None):
    """``source`` 'train' -> the cached BPE trained on ``paths`` (trained now when missing); else a directory."""
    from transformers import AutoTokenizer

    if source != "train":
        tokenizer = AutoTokenizer.from_pretrained(source)
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise UserError(f"model.tokenizer {source!r} has no mask or pad token; masked-LM pretraining needs both. "
                            f"Use model.tokenizer=train to train a byte-level BPE on data.files.")
        return tokenizer
    if cache_root is None:
        from peftkit.paths import cache_dir

        cache_root = cache_dir() / "tokenizers"
    target = Path(cache_root) / f"bpe-{_fingerprint(paths, vocab_size)}"
    if (target / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(target)
    import shutil
    import tempfile

    from peftkit.utils.atomic import TargetAppeared, publish_dir

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bpe-", dir=target.parent))
    tokenizer = train_bpe(paths, vocab_size, tmp)
    try:
        publish_dir(tmp, target)  # a concurrent run either sees nothing or the whole tokenizer
    except TargetAppeared:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
