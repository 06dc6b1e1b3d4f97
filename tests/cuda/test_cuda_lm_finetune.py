"""The causal-LM fine-tune (data.task wikitext2) on a GPU, fp32 and bf16 (skipped where there is none).

Same tiny setup as tests/test_finetune_lm.py; the start-point perplexity measured on the GPU in fp32 must equal
the CPU figure, and every method/dtype must train in the dtype it was asked for and lower the perplexity.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_finetune_lm import _write, lm_setup  # noqa: F401  (lm_setup is a fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["apiq", "lora", "full"])
def test_lm_finetune_trains_on_cuda(method, dtype, lm_setup, tmp_path):  # noqa: F811
    from peftkit.commands.train import finetune
    from peftkit.config.loader import load_recipe
    from peftkit.models.load import load_tokenizer
    from peftkit.tasks.causal_lm import LMText, perplexity_of_windows, text_windows
    from peftkit.train.pipeline import create_recipe_method, create_task

    recipe = lm_setup["recipe"](method, out=f"{method}-{dtype}", max_steps=12, eval_every=None)
    recipe["model"]["dtype"] = dtype
    m = json.loads((finetune(_write(tmp_path, recipe, f"{method}-{dtype}"), []) / "metrics.json").read_text())
    assert m["dtype"] == f"torch.{dtype}" and m["ppl"] < m["ppl_start"], m
    if dtype == "float32":  # the same start point scored on the CPU
        r = load_recipe(recipe, kind="finetune")
        model = create_task(r).build_model(create_recipe_method(r), None)
        windows = text_windows(load_tokenizer(recipe["model"]["name"]), LMText.read(str(lm_setup["data"])).eval_text, 32, 6)
        assert perplexity_of_windows(model, windows)["ppl"] == pytest.approx(m["ppl_start"], rel=1e-4)
