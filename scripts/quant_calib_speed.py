"""Seconds per block of ApiQ-bw calibration on the first blocks of a real model (default smollm2-135m).

  python scripts/quant_calib_speed.py --blocks 3 --batch-size 1 --bits 2

Prints one JSON line: settings, seconds of each block, mean seconds per block, first/last epoch loss.
The model is cut to its first ``--blocks`` decoder blocks (the others do not change a block's cost).
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.models.aliases import resolve_model
    from peftkit.quant.pipeline import quantize_model
    from peftkit.paths import wikitext_root
    from peftkit.utils.text_windows import random_windows, read_text, token_ids

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[: args.blocks]
    model.config.num_hidden_layers = args.blocks
    tokenizer = AutoTokenizer.from_pretrained(path)
    calib = random_windows(token_ids(tokenizer, read_text(f"{wikitext_root()}/wiki.valid.tokens")),
                           args.windows, args.seq_len, seed=0)
    opts = SimpleNamespace(method="apiq-bw", bits=args.bits, group_size=args.group_size, symmetric=False,
                           lora_r=args.lora_r, lora_alpha=16.0, lora_targets=None, loftq_iters=1, epochs=args.epochs,
                           lr_lora=5e-3, lr_clip=5e-2, weight_decay=0.0, aug_loss=True, batch_size=args.batch_size, seed=0)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = quantize_model(model, opts, calib, log=lambda line: None)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    calib_seconds = [c["seconds"] for b in result.blocks for c in b["calibration"]]
    print(json.dumps({"settings": vars(args), "total_seconds": round(total, 2),
                      "cpu_seconds_per_block": round(cpu / args.blocks, 2),
                      "calib_seconds_per_block": [round(s, 2) for s in calib_seconds],
                      "mean_calib_seconds": round(sum(calib_seconds) / len(calib_seconds), 2),
                      "block_seconds": [b["seconds"] for b in result.blocks],
                      "loss_first_epoch": [round(b["loss_first_epoch"], 5) for b in result.blocks],
                      "loss_last_epoch": [round(b["loss_last_epoch"], 5) for b in result.blocks],
                      "rel_output_error": [round(b["rel_output_error"], 5) for b in result.blocks]}))


if __name__ == "__main__":
    main()
