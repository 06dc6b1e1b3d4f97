"""Saved-for-backward bytes and step time of full, LoRA, PaFi, HiWi and Super-Tuning, before and after the
memory-lean linear forwards (peftkit.models.efficient_linear). Prints one JSON document.

"before" runs the same prepared model inside ``reference_forward``: the adapted layers read their assembled
weight under plain autograd, as they did before those forwards existed. Full, LoRA and HiWi on biases have no
such forward (their path is unchanged), so they are measured once.

saved_bytes: peftkit.bench.memory.saved_tensor_bytes (one training forward under saved_tensors_hooks, each
storage once, parameters and buffers excluded). step_seconds: median of forward + backward + AdamW step; the
contenders alternate, one step each per round, so load changes on a shared machine hit all of them alike.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/sparse_linear_memory.py [--batch 32 --seq 128 --repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time

import torch

from peftkit.utils.env import cpu_model

CONTENDERS = [  # (label, method, options)
    ("full", "full", {}),
    ("lora", "lora", {}),
    ("pafi", "pafi", {"rho": 0.005}),
    ("hiwi_weight", "hiwi", {"target": "weight"}),
    ("hiwi_bias", "hiwi", {"target": "bias"}),
    ("supertuning", "supertuning", {"rho": 0.005}),
]




def has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed steps per contender after its saved-bytes pass (2 keeps one core under 3 minutes)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peftkit.bench.memory import (
        build_model,
        make_batch,
        saved_tensor_bytes,
        trainable_params,
    )
    from peftkit.methods import get_method
    from peftkit.models.efficient_linear import installed_modules, reference_forward

    base = build_model({"model": args.model, "seed": 0})
    batch = make_batch(base.config.vocab_size, args.batch, args.seq)
    runs = {}  # "label/path" -> (model, optimizer, context factory)
    for label, name, options in CONTENDERS:
        method = get_method(name)
        model = method.prepare(copy.deepcopy(base), method.Options(**options))
        model.train()
        optimizer = torch.optim.AdamW(method.param_groups(model, 0.01), lr=1e-5, foreach=False)
        if installed_modules(model):
            runs[f"{label}/before"] = (model, optimizer, lambda m=model: reference_forward(m))
            runs[f"{label}/after"] = (model, optimizer, contextlib.nullcontext)
        else:
            runs[f"{label}/unchanged"] = (model, optimizer, contextlib.nullcontext)

    saved = {}
    for key, (model, _, context) in runs.items():  # also the untimed warm-up pass of each contender
        torch.manual_seed(0)
        with context():
            saved[key] = saved_tensor_bytes(model, batch)
    times = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, (model, optimizer, context) in runs.items():
            with context():
                start = time.perf_counter()
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)
                times[key].append(time.perf_counter() - start)

    full_bytes = saved["full/unchanged"]
    rows = []
    for key, (model, _, _) in runs.items():
        label, path = key.split("/")
        rows.append({"method": label, "path": path, "saved_bytes": saved[key], "saved_mib": round(saved[key] / 2**20, 1),
                     "saved_ratio_vs_full": round(saved[key] / full_bytes, 4),
                     "step_seconds": round(statistics.median(times[key]), 3),
                     "trainable_params": trainable_params(model)})
    print(json.dumps({"model": args.model, "batch": args.batch, "seq": args.seq, "threads": args.threads,
                      "repeats": args.repeats, "cpu": cpu_model(), "amx_bf16": has_amx(),
                      "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
