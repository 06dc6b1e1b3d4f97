"""`peftkit finetune` and `peftkit pretrain`: load the recipe of that kind, run the one pipeline."""

from __future__ import annotations

from pathlib import Path


def finetune(recipe_spec: str, overrides: list[str]) -> Path:
    from peftkit.config.loader import load_recipe

    recipe = load_recipe(recipe_spec, overrides, kind="finetune")  # every recipe error surfaces here
    from peftkit.train.pipeline import run_training

    return run_training(recipe)


def pretrain(recipe_spec: str, overrides: list[str]) -> Path:
    from peftkit.config.loader import load_recipe

    recipe = load_recipe(recipe_spec, overrides, kind="pretrain")
    from peftkit.train.pipeline import run_training

    return run_training(recipe) / "final"
