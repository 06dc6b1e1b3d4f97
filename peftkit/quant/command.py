"""`peftkit quantize RECIPE [key=value ...]`: quantize a model and initialise its LoRA, write the directory."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from peftkit.errors import UserError
from peftkit.quant.recipe import load_quant_recipe


def quantize(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Run the recipe; print progress; return the output directory."""
    spec = load_quant_recipe(recipe, list(overrides))
    out_dir = spec.out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        if not spec.output.overwrite:
            raise UserError(f"output directory {out_dir} already exists and is not empty; "
                            f"set output.overwrite=true or choose another output.dir.")
        shutil.rmtree(out_dir)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.eval.wikitext import random_windows, read_text, token_ids
    from peftkit.models.aliases import resolve_model
    from peftkit.quant.checkpoint import save_quantized
    from peftkit.quant.pipeline import quantize_model

    q, c = spec.quant, spec.calib
    start = time.perf_counter()
    path = resolve_model(spec.model.name)
    print(f"quantize: {spec.model.name} with {q.method}, {q.bits} bits, group {q.group_size}, LoRA r={q.lora_r} alpha={q.lora_alpha}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if torch.cuda.is_available():
        model = model.cuda()
    tokenizer = AutoTokenizer.from_pretrained(path)
    calib_ids = random_windows(token_ids(tokenizer, read_text(spec.calib_path)), c.n_windows, c.seq_len, c.seed)
    print(f"calibration: {c.n_windows} windows x {c.seq_len} tokens of {spec.calib_path}", flush=True)
    result = quantize_model(model, q, calib_ids, log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - start
    extra = {"source_model": spec.model.name, "symmetric": q.symmetric, "seconds": round(seconds, 1),
             "recipe": {"name": spec.name, "source": spec.source, "model": asdict(spec.model), "quant": asdict(q),
                        "calib": {**asdict(c), "path": str(spec.calib_path)}},
             "note": "smollm2-135m's weights were Q4_1-quantized once before conversion; FP = its dequantized fp32 copy."
             if spec.model.name == "smollm2-135m" else None}
    save_quantized(out_dir, model, result, tokenizer, extra)
    errors = [b["rel_output_error"] for b in result.blocks if "rel_output_error" in b]
    summary = {"output_dir": str(out_dir), "seconds": round(seconds, 1),
               "last_block_rel_output_error": errors[-1] if errors else None,
               "nan_events": sum(len(b["nan_events"]) for b in result.blocks)}
    print(json.dumps(summary), flush=True)
    return out_dir
