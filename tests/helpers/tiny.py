"""Tiny models and tokenizers built from config, for fast tests (no downloads, no real weights)."""

from __future__ import annotations

from pathlib import Path

WORDS = ("the a an movie film plot actor was is very really it this that and story scene ending cat dog sat on mat "
         "good great fun loved bad awful boring hated not but").split()
NEUTRAL = WORDS[:22]


def tiny_bert_config(num_labels: int = 2, layers: int = 2, hidden: int = 32, model_type: str = "bert", **kw):
    from transformers import AutoConfig

    base = dict(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                intermediate_size=hidden * 2, max_position_embeddings=64, num_labels=num_labels,
                type_vocab_size=2, pad_token_id=0)
    if model_type == "roberta":
        base.update(pad_token_id=1, bos_token_id=0, eos_token_id=2, max_position_embeddings=66, type_vocab_size=1)
    base.update(kw)
    return AutoConfig.for_model(model_type, **base)


def tiny_bert(num_labels: int = 2, seed: int = 0, **kw):
    """A 2-layer BERT (or RoBERTa with model_type='roberta') sequence classifier with random weights."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_bert_config(num_labels, **kw))


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, **kw):
    """A 2-layer LLaMA causal LM with random weights (group-size friendly widths)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", vocab_size=128, hidden_size=hidden, intermediate_size=hidden * 2,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=128, tie_word_embeddings=False, **kw)
    return AutoModelForCausalLM.from_config(cfg)


def tiny_bert_tokenizer(directory: Path):
    """A WordPiece tokenizer over WORDS saved to ``directory``; returns the loaded tokenizer."""
    from transformers import BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(directory)
    return tok


def save_tiny_classifier(directory: Path, num_labels: int = 2, seed: int = 0, **kw) -> Path:
    """A tiny BERT classifier + tokenizer saved as a normal transformers checkpoint directory."""
    directory = Path(directory)
    model = tiny_bert(num_labels=num_labels, seed=seed, **kw)
    model.save_pretrained(directory)
    tiny_bert_tokenizer(directory)
    return directory


def write_glue_task(root: Path, task: str = "sst2", n_train: int = 64, n_val: int = 32, seed: int = 0) -> Path:
    """Write a small learnable GLUE-shaped task (<root>/<task>/{train,validation}.jsonl)."""
    import json
    import random

    rng = random.Random(seed)
    pos, neg = ["good", "great", "fun", "loved"], ["bad", "awful", "boring", "hated"]
    d = Path(root) / task
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(n):
                label = i % 2
                word = rng.choice(pos if label else neg)
                filler = " ".join(rng.choice(NEUTRAL) for _ in range(rng.randint(2, 6)))
                if task in ("sst2", "cola"):
                    row = {"sentence": f"{filler} {word} movie", "label": label, "idx": i}
                elif task == "stsb":
                    row = {"sentence1": f"the {word} film", "sentence2": f"{filler} {word}", "label": float(rng.uniform(0, 5)), "idx": i}
                else:
                    row = {"sentence1": f"{filler} {word}", "sentence2": f"the {word} story", "label": label, "idx": i}
                f.write(json.dumps(row) + "\n")
    return Path(root)


def assert_base_architecture(merged, base) -> None:
    """A merged model is the base architecture again: same modules, parameter count and tensor shapes."""
    assert [(n, type(m)) for n, m in merged.named_modules()] == [(n, type(m)) for n, m in base.named_modules()]
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
