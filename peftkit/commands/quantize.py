"""`peftkit quantize RECIPE [key=value ...]`: quantize a model and initialise its LoRA, in a run directory."""

from __future__ import annotations

import json
import time
from pathlib import Path


def quantize(recipe_spec: str, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Run the recipe; print progress; return the output directory."""
    from peftkit.config.loader import load_recipe

    recipe = load_recipe(recipe_spec, list(overrides), kind="quantize")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.models.aliases import resolve_model
    from peftkit.models.load import check_model_dir
    from peftkit.quant.checkpoint import save_quantized
    from peftkit.quant.blocks import load_skeleton
    from peftkit.quant.pipeline import fill_released_weights, quantize_model
    from peftkit.train.pipeline import open_run
    from peftkit.paths import wikitext_root
    from peftkit.utils.text_windows import (
        random_windows,
        read_text,
        token_ids,
    )

    q, c = recipe.quant, recipe.calib
    calib_path = Path(c.root or wikitext_root()).expanduser() / c.file
    with open_run(recipe) as run:
        start = time.perf_counter()
        path = resolve_model(recipe.model.name)
        if Path(path).is_dir():
            check_model_dir(path, recipe.model.name)
        bits = f"{q.bits} bits, group {q.group_size}" if q.bits is not None else "not quantized"
        run.log(f"quantize: {recipe.model.name} with {q.method}, {bits}, LoRA r={q.lora_r} alpha={q.lora_alpha}")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # One block's weights in memory at a time, read from the safetensors files; a checkpoint whose tensor
        # names are not the model's own (or a hub id) is loaded whole.
        skeleton = load_skeleton(path, torch.float32, device) if Path(path).is_dir() else None
        model, weights = skeleton or (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device), None)
        tokenizer = AutoTokenizer.from_pretrained(path)
        calib_ids = random_windows(token_ids(tokenizer, read_text(calib_path)), c.n_windows, c.seq_len, c.seed)
        run.log(f"calibration: {c.n_windows} windows x {c.seq_len} tokens of {calib_path}")
        result = quantize_model(model, q, calib_ids, log=run.log, weights=weights)
        if weights is not None:
            fill_released_weights(model)  # the saver writes the quantized weights into the model: scratch space
        seconds = time.perf_counter() - start
        extra = {"source_model": recipe.model.name, "symmetric": q.symmetric, "seconds": round(seconds, 1),
                 "recipe": {"name": recipe.name, "source": recipe.source, **recipe.to_dict(),
                            "calib": {**c.model_dump(mode="json"), "path": str(calib_path)}},
                 "note": "smollm2-135m's weights were Q4_1-quantized once before conversion; FP = its dequantized fp32 copy."
                 if recipe.model.name == "smollm2-135m" else None}
        save_quantized(run.dir, model, result, tokenizer, extra)
        errors = [b["rel_output_error"] for b in result.blocks if "rel_output_error" in b]
        summary = {"output_dir": str(run.dir), "seconds": round(seconds, 1),
                   "last_block_rel_output_error": errors[-1] if errors else None,
                   "nan_events": sum(len(b["nan_events"]) for b in result.blocks)}
        run.log(json.dumps(summary))
    return run.dir
