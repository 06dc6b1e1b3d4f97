"""`peftkit plan RECIPE [key=value ...]`: per-device memory of a fine-tune, from the model's config alone."""

from __future__ import annotations

import json
from pathlib import Path


def plan(recipe_spec: str, overrides: list[str], world_size: int, device: str | None, memory: str | None,
         bits: int | None, json_out: str | None) -> str:
    """Load the recipe with its overrides, plan it, return the table (and write the plan's JSON if asked)."""
    from peftkit.config.loader import load_recipe

    recipe = load_recipe(recipe_spec, overrides, kind="finetune")
    from peftkit.bench.plan import machine_memory, parse_memory, plan_recipe

    device = device or _default_device()
    budget, source = (parse_memory(memory), "--memory") if memory else machine_memory(device)
    result = plan_recipe(recipe, world_size=world_size, device=device, bits=bits, memory=budget, memory_source=source)
    if json_out:
        from peftkit.utils.atomic import atomic_write_json

        atomic_write_json(Path(json_out), {"recipe": str(recipe_spec), "overrides": overrides, **result.to_dict()})
    return result.table()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
