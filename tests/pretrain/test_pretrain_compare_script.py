"""scripts/pretrain_compare.py: the from-scratch checkpoint is exactly the model pretraining starts from (plain
transformers' RobertaForMaskedLM initialised under the same seed, with the config and tokenizer a real `peftkit
pretrain` of the recipe writes), it loads for fine-tuning, and a partial rerun keeps the rows it did not rerun."""

import importlib.util
import json
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the a good bad movie film plot actor was is not very fun boring story scene cat dog sat on mat".split()


def script():
    spec = importlib.util.spec_from_file_location("pretrain_compare", ROOT / "scripts" / "pretrain_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_recipe(tmp_path) -> Path:
    import random

    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) for _ in range(300)))
    recipe = {"kind": "pretrain", "model": {"preset": "tiny", "vocab_size": 300},
              "data": {"files": [str(corpus)], "block_size": 32, "eval_files": []},
              "mlm": {"variant": "mlm", "flop_budget": 2e8}, "train": {"batch_size": 4, "lr": 1e-3},
              "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_scratch_checkpoint_is_the_untrained_start_of_pretraining(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification

    from peftkit.commands.train import pretrain

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    recipe = tiny_recipe(tmp_path)
    compare = script()
    start = compare.export_untrained(str(recipe), 7, tmp_path / "scratch")
    other = compare.export_untrained(str(recipe), 8, tmp_path / "scratch-8")

    config = RobertaConfig.from_pretrained(start)
    torch.manual_seed(7)
    reference = RobertaForMaskedLM(config).state_dict()  # plain transformers, the same seed
    exported = RobertaForMaskedLM.from_pretrained(start).state_dict()
    assert exported.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name
    different = RobertaForMaskedLM.from_pretrained(other).state_dict()
    assert not torch.equal(different["roberta.encoder.layer.0.intermediate.dense.weight"],
                           exported["roberta.encoder.layer.0.intermediate.dense.weight"])

    trained = pretrain(str(recipe), [])  # the same recipe really pretrained: same shape and tokenizer
    theirs, ours = RobertaConfig.from_pretrained(trained).to_dict(), config.to_dict()
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "type_vocab_size"):
        assert ours[key] == theirs[key], key
    assert AutoTokenizer.from_pretrained(start).get_vocab() == AutoTokenizer.from_pretrained(trained).get_vocab()
    assert json.loads((start / "pretrain.json").read_text())["pretrained"] is False
    RobertaForSequenceClassification.from_pretrained(start, num_labels=2)  # what the SST-2 fine-tune loads


def test_partial_rerun_keeps_the_other_rows_with_their_commit(tmp_path):
    compare = script()
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"rows": [
        {"variant": "mlm", "sst2_accuracy": 0.7, "commit": "aaa"},
        {"variant": "3ml-cross", "seed": 42, "sst2_accuracy": 0.6, "commit": "aaa"}]}))
    new = [{"variant": "3ml-cross", "seed": 42, "sst2_accuracy": 0.8, "commit": "bbb"},
           {"variant": "scratch", "seed": 43, "sst2_accuracy": 0.55, "commit": "bbb"},
           {"variant": "scratch", "seed": 42, "sst2_accuracy": 0.5, "commit": "bbb"}]
    rows = compare.merged_rows(new, old, keep=True)
    assert [(r["variant"], r["seed"], r["commit"]) for r in rows] == [
        ("mlm", 42, "aaa"), ("3ml-cross", 42, "bbb"), ("scratch", 42, "bbb"), ("scratch", 43, "bbb")]
    assert rows[1]["sst2_accuracy"] == 0.8  # the rerun replaces the old row
    assert [r["variant"] for r in compare.merged_rows(new, old, keep=False)] == ["3ml-cross", "scratch", "scratch"]


def test_curve_note_names_every_row_the_curves_do_not_show():
    compare = script()
    drawn = "loss curves: docs/results/pretrain-compare/loss_curves.png (pretraining loss per step of each variant)."
    assert compare.curve_note(drawn, []) == drawn
    once = compare.curve_note(drawn, ["3ml-cross seed 42"])
    assert once == drawn[:-1] + "; not redrawn for the rerun rows (3ml-cross seed 42)."
    twice = compare.curve_note(once, ["mlm seed 43", "3ml-cross seed 42"])
    assert twice == drawn[:-1] + "; not redrawn for the rerun rows (3ml-cross seed 42, mlm seed 43)."
