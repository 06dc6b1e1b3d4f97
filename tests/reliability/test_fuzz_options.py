"""Every option of every recipe kind (and of every method) against hostile values: the recipe loads or the loader
says what is wrong (UserError, exit 2) — never another exception. Values the loader accepts for a fine-tuning
recipe are then run for one step on a tiny model: they train (exit 0) or stop with a user error or a failed run,
never a traceback. Fixed seed, bounded count: the same cases on every run."""

from __future__ import annotations

import os
import random

import pytest

from peftkit.config.loader import load_recipe
from peftkit.config.schema import KINDS
from peftkit.errors import RunFailed, UserError
from peftkit.utils.registry import METHODS

HOSTILE = [None, True, False, 0, 1, -1, 7, 2**31, 2**63, 10**30, -1e-3, 0.5, 1.5, float("nan"), float("inf"),
           -float("inf"), "", "abc", "1e-3", "-1", "..", "/", "a\x00b", "~", "$NO_SUCH_VARIABLE_X", [], [1], ["x"],
           [0.9, 1.5], {}, {"a": 1}]


def option_paths(kind: str) -> list[tuple[str, str, str | None]]:
    """(section, option, method) for every option a recipe of ``kind`` can hold."""
    cls = KINDS[kind]
    paths = []
    for section in cls.SECTIONS:
        if section == "method":
            for entry in METHODS.entries():
                paths += [("method", name, entry.name) for name in entry.target.Options.model_fields]
            continue
        paths += [(section, name, None) for name in cls.model_fields[section].annotation.model_fields]
    return paths


@pytest.fixture
def bases(tiny_run_setup, tmp_path):
    from helpers.quant import write_model_dir, write_wikitext

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat and the dog ran\n" * 80)
    return {
        "finetune": tiny_run_setup("lora", max_steps=1, save_every=1, eval_every=1),
        "pretrain": {"model": {"preset": "tiny", "vocab_size": 300}, "data": {"files": [str(corpus)], "eval_files": []},
                     "train": {"max_steps": 1}, "output": {"dir": str(tmp_path / "pretrain")}},
        "quantize": {"model": {"name": str(write_model_dir(tmp_path / "qmodel"))},
                     "calib": {"root": str(write_wikitext(tmp_path / "wt"))}, "quant": {"group_size": 16},
                     "output": {"dir": str(tmp_path / "quant")}},
    }


def mutated(base: dict, section: str, option: str, method: str | None, value) -> dict:
    import copy

    raw = copy.deepcopy(base)
    if method is not None:
        raw["method"] = {"name": method}
    raw.setdefault(section, {})[option] = value
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_option_takes_any_value_or_says_why(kind, bases):
    rng = random.Random(1234)
    paths = option_paths(kind)
    assert len(paths) >= 10
    checked = refused = 0
    for section, option, method in paths:
        for value in rng.sample(HOSTILE, 12):
            raw = mutated(bases[kind], section, option, method, value)
            try:
                load_recipe(raw, kind=kind)
            except UserError as e:
                assert str(e).strip() and "Traceback" not in str(e)
                refused += 1
            checked += 1
    assert refused > checked / 3  # the hostile values are mostly refused, by key


@pytest.mark.slow
def test_accepted_fine_tuning_values_train_or_stop_cleanly(bases, tmp_path):
    """One step on a tiny BERT for a fixed sample of accepted mutations of every fine-tuning option."""
    from peftkit.train.pipeline import run_training

    rng = random.Random(99)
    accepted = []
    for section, option, method in option_paths("finetune"):
        if section == "output":
            continue
        for value in HOSTILE:
            raw = mutated(bases["finetune"], section, option, method, value)
            try:
                accepted.append((f"{section}.{option}={value!r} ({method or 'lora'})", load_recipe(raw, kind="finetune")))
            except UserError:
                pass
    print(f"{len(accepted)} accepted mutations")
    sample = rng.sample(accepted, min(len(accepted), int(os.environ.get("PEFTKIT_FUZZ_RUNS", 150))))
    outcomes = {}
    for i, (label, recipe) in enumerate(sample):
        recipe.output.dir = str(tmp_path / f"run{i}")
        try:
            run_training(recipe)
            outcomes[label] = "ok"
        except (UserError, RunFailed) as e:
            outcomes[label] = f"{type(e).__name__}: {str(e)[:80]}"
    assert sum(v == "ok" for v in outcomes.values()) >= len(sample) // 2, outcomes
