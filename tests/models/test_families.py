"""Model families: tiny random models of every described family with every method that claims it (a few steps on
one's own rows, then predict); a family a method does not claim is refused with the reason; the support page is
generated from the code; hub ids load from the local Hugging Face cache without the network."""

import pytest
from helpers.own_data import decoder_tokenizer, sentiment_rows, write_rows
from helpers.tiny import tiny_bert_tokenizer

from peftkit.config.loader import load_recipe
from peftkit.errors import UserError
from peftkit.models.families import FAMILIES

SIZES = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=70),
    "deberta-v2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       max_position_embeddings=64),
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                max_position_embeddings=64),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
}
SIZES["xlm-roberta"] = SIZES["roberta"]
SIZES["mistral"] = SIZES["qwen2"] = SIZES["llama"]


def save_family(directory, family: str, seed: int = 0):
    """A random 2-layer classifier of ``family`` with a tokenizer, as a checkpoint directory."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if FAMILIES[family].kind == "encoder":
        tok = tiny_bert_tokenizer(directory)
        if family != "bert":  # these take no token type ids
            tok.model_input_names = ["input_ids", "attention_mask"]
            tok.save_pretrained(directory)
        special = {"pad_token_id": 1 if "roberta" in family else 0}
    else:
        tok = decoder_tokenizer(directory, chat=False)
        tok.model_input_names = ["input_ids", "attention_mask"]
        tok.save_pretrained(directory)
        special = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, vocab_size=len(tok), num_labels=2, **special, **SIZES[family])
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    return directory


def claims():
    from peftkit.utils.registry import METHODS

    pairs = []
    for family in FAMILIES:
        for entry in METHODS.entries():
            method = entry.target
            if entry.name != "apiq" and (method.families is None or family in method.families):
                pairs.append((family, entry.name))
    return pairs


def test_every_family_the_issue_names_is_described():
    assert set(FAMILIES) == {"bert", "roberta", "deberta-v2", "distilbert", "xlm-roberta", "llama", "mistral", "qwen2",
                             "opt", "gpt2"}
    assert {f for f, fam in FAMILIES.items() if fam.kind == "decoder"} == {"llama", "mistral", "qwen2", "opt", "gpt2"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rows")
    return write_rows(tmp / "train.csv", sentiment_rows(24))


@pytest.mark.slow
@pytest.mark.parametrize("family,method", claims())
def test_each_claimed_family_trains_a_few_steps_then_predicts(tmp_path, rows, family, method):
    from peftkit.commands.predict import predict
    from peftkit.train.pipeline import run_training

    model = save_family(tmp_path / family, family)
    r = {"model": {"name": str(model)}, "data": {"train_file": str(rows), "label_column": "sentiment", "max_length": 16},
         "method": {"name": method}, "output": {"dir": str(tmp_path / "run")},
         "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "threads": 1, "eval_batch_size": 8}}
    run = run_training(load_recipe(r, kind="finetune"))
    records = predict(str(run), str(rows))
    assert len(records) == 24 and {r["label"] for r in records} <= {"negative", "positive"}


@pytest.mark.parametrize("family,method,why", [
    ("gpt2", "meft1", "inputs are not wired"),
    ("distilbert", "lora", "default target projections"),
    ("gpt2", "supertuning", "nn.Linear"),
    ("llama", "bitfit", "no bias terms"),
])
def test_a_family_the_method_does_not_claim_is_refused_with_the_reason(tmp_path, rows, family, method, why):
    from peftkit.train.pipeline import run_training

    model = save_family(tmp_path / family, family)
    r = {"model": {"name": str(model)}, "data": {"train_file": str(rows), "label_column": "sentiment", "max_length": 16},
         "method": {"name": method}, "output": {"dir": str(tmp_path / "run")}, "train": {"max_steps": 1}}
    with pytest.raises(UserError) as e:
        run_training(load_recipe(r, kind="finetune"))
    assert f"method {method} does not support {family} models" in str(e.value) and why in str(e.value)
    assert not (tmp_path / "run").exists()


def test_the_support_page_is_generated_from_the_code():
    from peftkit.commands.support import DOC, support_markdown

    assert DOC.read_text() == support_markdown(), "docs/methods/support.md is stale: python -m peftkit.commands.support"
    assert "| lora | yes | yes | - |" in support_markdown()


def test_a_hub_id_in_the_local_cache_loads_without_the_network(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from transformers import AutoModelForSequenceClassification

    from peftkit.models.load import load_model, load_tokenizer

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-bert"
    save_family(repo / "snapshots" / commit, "bert")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model("someone/tiny-bert", num_labels=2)
    reference = AutoModelForSequenceClassification.from_pretrained(repo / "snapshots" / commit)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert load_tokenizer("someone/tiny-bert").vocab_size == reference.config.vocab_size
    with pytest.raises(UserError, match="nor in the local Hugging Face cache"):
        load_model("someone/not-cached")
