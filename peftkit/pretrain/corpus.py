"""Text files -> token blocks for pretraining.

Readers: plain text (each non-empty line is a paragraph; WikiText's tokenized release works as is) and
GLUE-style .jsonl (the sentence fields of each row). Paragraphs are tokenized without special tokens,
joined with </s> separators into one stream and cut into blocks of ``block_size`` tokens, each wrapped
as <s> ... </s> (RoBERTa's "full sentences" packing). A final partial block is dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from peftkit.errors import UserError

TEXT_FIELDS = ("text", "sentence", "sentence1", "sentence2", "question", "premise", "hypothesis")
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_file(spec: str) -> Path | None:
    """A data path as given (absolute or from the working directory), else from the repository root."""
    import os

    path = Path(os.path.expandvars(os.path.expanduser(spec)))
    for candidate in (path, REPO_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    return None


def read_paragraphs(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {number} is not valid JSON ({e.msg}); "
                                    f"fix the file or drop it from data.files.") from None
                for field in TEXT_FIELDS:
                    if isinstance(row.get(field), str) and row[field].strip():
                        yield row[field].strip()
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                yield line.strip()


def iter_corpus(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        yield from read_paragraphs(path)


def pack_blocks(paragraph_ids: Iterator[list[int]], block_size: int, bos_id: int, eos_id: int,
                limit: int | None = None) -> list[dict]:
    """Join token lists with </s> and cut the stream into <s> + (block_size - 2 tokens) + </s> blocks."""
    body = block_size - 2
    blocks: list[dict] = []
    buffer: list[int] = []
    for ids in paragraph_ids:
        buffer.extend(ids)
        buffer.append(eos_id)
        while len(buffer) >= body:
            blocks.append({"input_ids": [bos_id, *buffer[:body], eos_id]})
            buffer = buffer[body:]
            if limit is not None and len(blocks) >= limit:
                return blocks
    return blocks


def build_blocks(paths: list[Path], tokenizer, block_size: int, limit: int | None = None, chunk: int = 1000) -> list[dict]:
    """Tokenize the files (in batches, for the fast tokenizer) and pack them into blocks."""

    def tokenized() -> Iterator[list[int]]:
        batch: list[str] = []
        for text in iter_corpus(paths):
            batch.append(text)
            if len(batch) == chunk:
                yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
                batch = []
        if batch:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]

    return pack_blocks(tokenized(), block_size, tokenizer.bos_token_id, tokenizer.eos_token_id, limit)
