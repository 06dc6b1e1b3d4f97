"""Data files of one's own (CSV, JSONL, Parquet) and tiny decoders with a chat-templated tokenizer, for the tests of
the `dataset` task, `peftkit predict`, `peftkit generate` and `peftkit eval --task FILE`."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from helpers.tiny import NEUTRAL, WORDS

POSITIVE, NEGATIVE = ["good", "great", "fun", "loved"], ["bad", "awful", "boring", "hated"]
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} <|end|> "
                 "{% else %}<|assistant|> {{ m['content'] }} <|end|> {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Rows as .csv, .jsonl or .parquet, by the suffix of ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(path.suffix)
    return path


def sentiment_rows(n: int, seed: int = 0, text: str = "review", label: str = "sentiment") -> list[dict]:
    """Learnable rows: a polar word among neutral ones; labels negative/positive (alternating)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 1
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        filler = " ".join(rng.choice(NEUTRAL) for _ in range(rng.randint(2, 6)))
        rows.append({"id": i, text: f"{filler} {word} movie", label: "positive" if positive else "negative"})
    return rows


def score_rows(n: int, seed: int = 0) -> list[dict]:
    """Regression rows: the score is the number of positive words (0..3) plus a little noise."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(0, 3)
        words = [rng.choice(POSITIVE) for _ in range(k)] + [rng.choice(NEUTRAL) for _ in range(4 - k)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "score": k + rng.uniform(-0.1, 0.1)})
    return rows


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs: label 1 when both sides carry the same polar word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a = rng.choice(POSITIVE + NEGATIVE)
        b = a if i % 2 else rng.choice([w for w in POSITIVE + NEGATIVE if w != a])
        rows.append({"first": f"the {a} film", "second": f"{rng.choice(NEUTRAL)} {b}", "same": i % 2})
    return rows


def qa_rows(n: int, seed: int = 0) -> list[dict]:
    """SFT rows: the prompt names a polar word, the answer is its polarity."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(POSITIVE + NEGATIVE)
        rows.append({"question": f"is {word} good or bad", "answer": "good" if word in POSITIVE else "bad"})
    return rows


def decoder_tokenizer(directory: Path, chat: bool = True, extra_words: tuple[str, ...] = ()):
    """A word-level tokenizer with <s>, </s>, <pad> and chat markers (and ``extra_words``); a chat template when
    ``chat``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = list(dict.fromkeys(specials + WORDS + ["is", "or", "good", "bad", *extra_words]))
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", additional_special_tokens=specials[4:])
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(directory)
    return tok


DECODER_CONFIGS = {
    "llama": dict(intermediate_size=64, num_key_value_heads=2),
    "mistral": dict(intermediate_size=64, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(intermediate_size=64, num_key_value_heads=2),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32, do_layer_norm_before=True),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
}


def save_tiny_decoder(directory: Path, family: str = "llama", chat: bool = True, seed: int = 0) -> Path:
    """A 2-layer random causal LM of ``family`` and the word-level tokenizer, saved as a checkpoint directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    tok = decoder_tokenizer(directory, chat)
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    if family != "gpt2":
        common.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **common, **DECODER_CONFIGS[family])
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory
