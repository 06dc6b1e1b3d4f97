"""`peftkit pretrain`: recipe errors are UserErrors by key path; a tiny run exports a checkpoint that loads as
RobertaForSequenceClassification with the pretrained encoder weights (3ML's extras dropped)."""

import json
import random

import pytest
import torch
import yaml

from peftkit.config.loader import load_recipe as load_any_recipe
from peftkit.errors import UserError


def load_recipe(spec, overrides=()):
    return load_any_recipe(spec, overrides, kind="pretrain")

WORDS = "the a good bad movie film plot actor was is not very fun boring story scene cat dog sat on mat".split()


def _corpus(path, lines=300, seed=0):
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) for _ in range(lines)) + "\n")
    return path


def test_recipe_errors_are_listed_by_key(tmp_path):
    with pytest.raises(UserError) as err:
        load_recipe({"model": {"preset": "huge"}, "data": {"files": [str(tmp_path / "missing.txt")], "block_size": 4},
                     "mlm": {"variant": "3ml-self", "mask_rate": 1.5, "full_length_layers": 0, "flop_budget": 1e12,
                             "replace_probs": [0.5, 0.1, 0.1]},
                     "train": {"max_steps": 10, "lr": "fast"}, "extra": {}})
    message = str(err.value)
    for key in ("model.preset", "data.files[0]", "mlm.mask_rate", "mlm.flop_budget", "mlm.replace_probs",
                "train.lr", "extra: unknown section"):
        assert key in message, key


def test_recipe_bounds_depend_on_the_preset(tmp_path):
    corpus = _corpus(tmp_path / "c.txt")
    with pytest.raises(UserError, match=r"mlm.full_length_layers: must be in 1..2"):
        load_recipe({"model": {"preset": "tiny"}, "data": {"files": [str(corpus)], "eval_files": []},
                     "mlm": {"variant": "3ml-self", "full_length_layers": 3}})
    with pytest.raises(UserError, match=r"data.block_size: must be in 8..64"):
        load_recipe({"model": {"preset": "tiny"}, "data": {"files": [str(corpus)], "block_size": 100, "eval_files": []}})


def test_shipped_recipes_validate():
    from peftkit.config.loader import configs_dir

    names = sorted(p.stem for p in configs_dir().glob("*/pretrain-*.yaml"))
    assert {"pretrain-mlm-small", "pretrain-3ml-self-small", "pretrain-3ml-cross-small"} <= set(names)
    budgets = {}
    for name in names:
        recipe = load_recipe(name)
        if name.endswith("-small"):
            budgets[name] = recipe.mlm.flop_budget
    assert len(set(budgets.values())) == 1  # equal compute across the small variants


@pytest.mark.parametrize("variant", ["3ml-self", "3ml-cross"])
def test_tiny_pretraining_exports_a_standard_roberta(tmp_path, monkeypatch, variant):
    from transformers import RobertaForMaskedLM, RobertaForSequenceClassification

    from peftkit.commands.train import pretrain
    from peftkit.pretrain.cost import expected_step_flops

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    corpus = _corpus(tmp_path / "corpus.txt")
    held_out = _corpus(tmp_path / "held_out.txt", lines=40, seed=1)
    recipe = {"model": {"preset": "tiny", "vocab_size": 300},
              "data": {"files": [str(corpus)], "block_size": 32, "eval_files": [str(held_out)], "eval_limit": 4},
              "mlm": {"variant": variant, "full_length_layers": 1, "decoder_layers": 1, "flop_budget": 5e8},
              "train": {"batch_size": 4, "lr": 1e-3, "log_every": 1},
              "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    final = pretrain(str(path), [])

    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["max_steps"] == round(5e8 / plan["flops_per_step"]) >= 2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == plan["max_steps"] and metrics["eval_loss"] > 0

    mlm = RobertaForMaskedLM.from_pretrained(final)
    classifier = RobertaForSequenceClassification.from_pretrained(final, num_labels=2)
    encoder = dict(mlm.roberta.named_parameters())
    for name, param in classifier.roberta.named_parameters():
        torch.testing.assert_close(param, encoder[name], msg=name)
    from safetensors.torch import load_file

    saved = load_file(str(final / "model.safetensors"))
    assert not any("mask_embedding" in k or "decoder.layers" in k for k in saved)
    assert (final / "tokenizer_config.json").exists()
    config = mlm.config
    assert config.num_hidden_layers == 2 and config.vocab_size == plan["vocab_size"]
    # the same analytic count the plan used
    assert plan["flops_per_step"] == pytest.approx(expected_step_flops(
        config, variant, 4, 32, 0.5, full_length_layers=1, decoder_layers=1))


def test_resume_after_interruption_gives_the_same_weights(tmp_path, monkeypatch):
    """The corruption draws from torch's global RNG, which the trainer's checkpoints restore."""
    import shutil

    from safetensors.torch import load_file

    from peftkit.commands.train import pretrain

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    corpus = _corpus(tmp_path / "corpus.txt")
    recipe = {"model": {"preset": "tiny", "vocab_size": 300},
              "data": {"files": [str(corpus)], "block_size": 32, "eval_files": []},
              "mlm": {"variant": "3ml-self", "full_length_layers": 1},
              "train": {"batch_size": 4, "max_steps": 4, "save_every": 2, "keep_last": 5, "select_best": False},
              "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    final = pretrain(str(path), [])
    straight = load_file(str(final / "model.safetensors"))

    # simulate a crash after step 2: drop the later checkpoint and the export, then resume
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    shutil.rmtree(final)
    resumed = load_file(str(pretrain(str(path), ["train.resume=auto"]) / "model.safetensors"))
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def test_cli_reports_a_bad_recipe_with_exit_code_2(tmp_path):
    from typer.testing import CliRunner

    from peftkit.cli import app

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"mlm": {"variant": "3ml-sideways"}, "data": {"files": []}}))
    result = CliRunner().invoke(app, ["pretrain", str(path)])
    assert result.exit_code == 2
    assert "mlm.variant" in result.output and "data.files" in result.output
