"""RoBERTa shapes by name. ``tiny`` is for tests, ``small`` for CPU runs, ``base``/``large`` are the
published RoBERTa shapes (used to measure compute; training them needs a GPU)."""

from __future__ import annotations

from dataclasses import dataclass

ROBERTA_VOCAB = 50265
ROBERTA_POSITIONS = 514  # 512 tokens + RoBERTa's offset of padding_idx + 1


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab_size: int
    max_positions: int


PRESETS: dict[str, Shape] = {
    "tiny": Shape(layers=2, hidden=32, heads=4, ffn=64, vocab_size=64, max_positions=66),
    "small": Shape(layers=6, hidden=256, heads=4, ffn=1024, vocab_size=8192, max_positions=ROBERTA_POSITIONS),
    "base": Shape(layers=12, hidden=768, heads=12, ffn=3072, vocab_size=ROBERTA_VOCAB, max_positions=ROBERTA_POSITIONS),
    "large": Shape(layers=24, hidden=1024, heads=16, ffn=4096, vocab_size=ROBERTA_VOCAB, max_positions=ROBERTA_POSITIONS),
}


def roberta_config(preset: str, vocab_size: int | None = None, max_positions: int | None = None,
                   attn_implementation: str | None = None, special_ids: dict[str, int] | None = None, **overrides):
    """A RobertaConfig of the named shape; ``vocab_size``/``max_positions`` replace the preset's when given.

    ``special_ids`` (pad/bos/eos token ids) come from the tokenizer; RoBERTa's defaults are bos 0, pad 1, eos 2.
    Further keyword arguments replace config fields (e.g. ``num_hidden_layers=3``).
    """
    from transformers import RobertaConfig

    shape = PRESETS[preset]
    ids = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, **(special_ids or {})}
    fields = dict(vocab_size=vocab_size or shape.vocab_size, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, intermediate_size=shape.ffn,
                  max_position_embeddings=max_positions or shape.max_positions, type_vocab_size=1, **ids)
    config = RobertaConfig(**{**fields, **overrides})  # overrides (e.g. num_hidden_layers) win over the preset
    if attn_implementation:
        config._attn_implementation = attn_implementation
    return config
