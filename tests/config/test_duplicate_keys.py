"""A key named twice in one mapping is refused (exit 2, the key and both lines), never resolved to the last one."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.reliability import invoke, write_recipe

from peftkit.config.loader import load_recipe, load_settings
from peftkit.errors import UserError
from peftkit.utils.safe_yaml import load_yaml_bounded

TWO_TRAIN_SECTIONS = """\
data:
  task: sst2
train:
  lr: 0.5
  max_steps: 3
method:
  name: lora
train:
  seed: 4
"""


def test_two_train_sections_exit_2_naming_the_key_and_both_lines(tmp_path):
    out = tmp_path / "never-created"
    recipe = write_recipe(tmp_path / "twice.yaml", TWO_TRAIN_SECTIONS + f"output:\n  dir: {out}\n")
    result = invoke("finetune", recipe)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "'train' twice" in text and "line 3" in text and "line 8" in text and "twice.yaml" in text, text
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  lr: 0.1\n  seed: 3\n  lr: 0.2\n", "train.lr", (2, 4)),
    ("method:\n  name: lora\n  targets:\n    - {a: 1, a: 2}\n", "method.targets.0.a", (4, 4)),
    ("a: 1\nb: 2\na: 3\n", "a", (1, 3)),
])
def test_a_repeated_key_at_any_depth_is_refused(tmp_path, text, key, lines):
    path = Path(write_recipe(tmp_path / "r.yaml", text))
    with pytest.raises(UserError) as e:
        load_recipe(str(path))
    message = str(e.value)
    assert f"{key!r} twice" in message and f"line {lines[0]}" in message and f"line {lines[1]}" in message, message


def test_distinct_keys_and_merges_are_not_duplicates():
    text = "base: &b {lr: 0.1, seed: 3}\ntrain:\n  <<: *b\n  seed: 4\nother: *b\nkeys: {1: a, '1': b}\n"
    assert load_yaml_bounded(text) == {"base": {"lr": 0.1, "seed": 3}, "train": {"lr": 0.1, "seed": 4},
                                       "other": {"lr": 0.1, "seed": 3}, "keys": {1: "a", "1": "b"}}


def test_an_override_given_twice_is_refused():
    with pytest.raises(UserError, match=r'train.lr is set twice, by "train.lr=0.1" and by "train.lr=0.2"'):
        load_recipe({"method": {"name": "lora"}}, ["train.lr=0.1", "train.lr=0.2"])
    with pytest.raises(UserError, match="'r' twice"):
        load_recipe({"method": {"name": "lora"}}, ["method={name: lora, r: 4, r: 8}"])
    assert load_recipe({"method": {"name": "lora"}}, ["train.lr=0.1", "train.seed=5"]).train.seed == 5


def test_a_bench_setting_given_twice_is_refused():
    from peftkit.bench import latency

    with pytest.raises(UserError, match="set twice"):
        load_settings(latency.LatencySettings, ["repeats=2", "repeats=3"], "bench latency")
