"""A LoRA run's console and train.log hold peftkit's lines, not the notices of libraries it happens to import.

peft's LoRA dispatch imports GPT-QModel and transformers imports torchao whenever they are installed (quantized base
or not): GPT-QModel prints a banner, torchao logs a "Failed to load" line per CUDA kernel a CPU build cannot load.
"""

from __future__ import annotations

import importlib.util

import pytest
from helpers.reliability import make_setup, recipe, run_cli, write_recipe

# (installed package, what its notices contain)
NOISE = [("gptqmodel", "GPT-QModel"), ("gptqmodel", "GIL is enabled"), ("torchao", "Failed to load"),
         ("torchao", "_pytree")]
INSTALLED = [(package, text) for package, text in NOISE if importlib.util.find_spec(package) is not None]


@pytest.mark.slow
@pytest.mark.skipif(not INSTALLED, reason="neither gptqmodel nor torchao is installed: no notices to keep quiet")
def test_a_lora_finetune_prints_no_library_notices(tmp_path):
    setup = make_setup(tmp_path)
    path = write_recipe(tmp_path / "lora.yaml", recipe(setup, "run", method="lora", max_steps=2))
    result = run_cli("finetune", path)
    assert result.returncode == 0, result.stdout + result.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    assert "method lora on" in result.stdout and "method lora on" in log  # the run's own lines are there
    for where, text in (("stdout", result.stdout), ("stderr", result.stderr), ("train.log", log)):
        for package, needle in INSTALLED:
            assert needle not in text, f"{package}'s notice {needle!r} in the run's {where}:\n{text}"
