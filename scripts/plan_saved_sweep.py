"""Where bench/plan.py's saved-tensor coefficients come from: bench.costs.saved_tensor_bytes (what autograd keeps
between forward and backward) over tiny random BERT and LLaMA models, one width, depth, vocabulary, head count or
length changed at a time, and a least-squares fit per block kind and method (elements per token: bytes / 4).

  .venv/bin/python scripts/plan_saved_sweep.py [--out saved.json]

The fit's columns: post-norm (BERT) layers*h, layers*i, layers*heads*seq, h, vocab, 1; pre-norm (LLaMA) layers*h,
layers*i, layers*kv_width, h, vocab, layers. MEFT's and checkpointing's saved bytes do not grow with depth.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
BASE = {"h": 64, "L": 2, "i": 128, "V": 1000, "heads": 2, "s": 64}
CHANGES = [{}, {"L": 4}, {"h": 128, "heads": 4}, {"i": 256}, {"V": 2000}, {"s": 32}, {"heads": 4}]
METHODS = ("full", "lora", "pafi", "meft3", "full+gc")


def model_of(kind: str, p: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    if kind == "bert":
        config = AutoConfig.for_model("bert", hidden_size=p["h"], num_hidden_layers=p["L"], num_attention_heads=p["heads"],
                                      intermediate_size=p["i"], vocab_size=p["V"], max_position_embeddings=512,
                                      num_labels=2)
        return AutoModelForSequenceClassification.from_config(config)
    config = AutoConfig.for_model("llama", hidden_size=p["h"], num_hidden_layers=p["L"], num_attention_heads=p["heads"],
                                  num_key_value_heads=1, intermediate_size=p["i"], vocab_size=p["V"],
                                  max_position_embeddings=2048, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config)


def main() -> None:
    import numpy as np
    import torch

    from peftkit.bench.costs import prepare, saved_tensor_bytes

    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows, batch = [], 2
    for kind in ("bert", "llama"):
        for change in CHANGES:
            p = {**BASE, **change}
            for method in METHODS:
                try:
                    _, model = prepare(method, model_of(kind, p))
                except Exception as e:  # a method that refuses this shape (reported, left out of the fit)
                    print(f"{kind} {p} {method}: {e}")
                    continue
                model.train()
                ids = torch.randint(5, p["V"], (batch, p["s"]))
                inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                if kind == "bert":
                    inputs.update(token_type_ids=torch.zeros_like(ids), labels=torch.randint(0, 2, (batch,)))
                else:
                    inputs["labels"] = ids.clone()
                rows.append({"kind": kind, "method": method, **p,
                             "per_token": saved_tensor_bytes(model, inputs) / (batch * p["s"])})
    for kind in ("bert", "llama"):
        for method in METHODS:
            picked = [r for r in rows if r["kind"] == kind and r["method"] == method]
            if not picked:
                continue
            if kind == "bert":
                x = [[r["L"] * r["h"], r["L"] * r["i"], r["L"] * r["heads"] * r["s"], r["h"], r["V"], 1] for r in picked]
            else:
                x = [[r["L"] * r["h"], r["L"] * r["i"], r["L"] * r["h"] // r["heads"], r["h"], r["V"], r["L"]]
                     for r in picked]
            y = np.array([r["per_token"] for r in picked])
            coef, *_ = np.linalg.lstsq(np.array(x, float), y, rcond=None)
            worst = float(np.abs(np.array(x, float) @ coef - y).max())
            print(f"{kind:5s} {method:8s} elements per token: {np.round(coef / 4, 3).tolist()} (worst residual {worst:.1f} B)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
