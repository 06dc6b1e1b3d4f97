"""Inference latency: base vs merged PaFi / HiWi (weight, bias) vs unmerged LoRA.

The claim under test (PaFi/HiWi paper): once merged, these methods leave a plain pretrained-architecture
model, so their latency ratio to the base is 1.00, while an unmerged LoRA adds work to every forward.
Every adapter gets non-zero values first, so merging writes real changes into the weights. A second copy of
the unmodified base is timed as one more contender: its distance from 1.00 is the noise of the measurement.

Method (docs/benchmarks.md): one process, one fixed batch of random token ids, model.eval() and
torch.inference_mode(); contenders are interleaved — each round times one forward of each, in a
rotated order — so that machine drift hits all alike; median over >= 20 timed rounds after warm-up.

Options (all optional): model (alias or directory, default minilm-l6), batch_size, seq_len,
repeats, warmup, rho (PaFi), r (HiWi), lora_r, threads, device, seed.
"""

from __future__ import annotations

import copy

from peftkit.bench.common import time_interleaved


def build_contenders(base, opts: dict) -> dict:
    """name -> model; each adapter is given non-zero trained-looking values before merging."""
    import torch

    from peftkit.methods import get_method

    def perturb(params, scale):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * scale)

    # The base is a deep copy too, so that every contender's tensors were allocated the same way
    # (from_pretrained's may be memory-mapped from the checkpoint file).
    contenders = {"base": copy.deepcopy(base)}

    pafi = get_method("pafi")
    model = pafi.prepare(copy.deepcopy(base), pafi.Options(rho=opts["rho"]))
    perturb([p for n, p in model.named_parameters() if n.endswith(".values")], 0.02)
    contenders["pafi (merged)"] = pafi.merge(model)

    hiwi = get_method("hiwi")
    for target in ("weight", "bias"):
        model = hiwi.prepare(copy.deepcopy(base), hiwi.Options(target=target, r=opts["r"]))
        perturb([p for n, p in model.named_parameters() if n.endswith(".up")], 0.02)
        contenders[f"hiwi-{target} (merged)"] = hiwi.merge(model)

    lora = get_method("lora")
    model = lora.prepare(copy.deepcopy(base), lora.Options(r=opts["lora_r"]))
    perturb([p for n, p in model.named_parameters() if "lora_B" in n], 0.02)
    contenders["lora (unmerged)"] = model
    # A second, identical copy of the base: its ratio is the bench's own noise floor. Any merged method within
    # that distance of 1.00 costs nothing measurable (on 2 shared cores identical copies differ by a few %).
    contenders["base (identical copy)"] = copy.deepcopy(base)
    return contenders


def run(quick: bool, options: dict) -> list[dict]:
    import torch
    from transformers import AutoModelForSequenceClassification

    from peftkit.models.aliases import resolve_model

    opts = {"model": "minilm-l6", "batch_size": 8 if quick else 32, "seq_len": 64 if quick else 128,
            "repeats": 20, "warmup": 3, "rho": 0.005, "r": 8, "lora_r": 8, "threads": None,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "seed": 0, **(options or {})}
    if opts["threads"]:
        torch.set_num_threads(int(opts["threads"]))
    torch.manual_seed(opts["seed"])
    device = torch.device(opts["device"])
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model(opts["model"]), num_labels=2,
                                                              dtype=torch.float32)
    contenders = {name: m.to(device).eval() for name, m in build_contenders(base, opts).items()}

    vocab = base.config.vocab_size
    batch = {"input_ids": torch.randint(min(5, vocab - 1), vocab, (opts["batch_size"], opts["seq_len"]), device=device),
             "attention_mask": torch.ones(opts["batch_size"], opts["seq_len"], dtype=torch.long, device=device)}

    def forward_of(model):
        def forward():
            with torch.inference_mode():
                return model(**batch).logits
        return forward

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"latency: {opts['model']}, batch {opts['batch_size']} x {opts['seq_len']} tokens, "
          f"{opts['repeats']} interleaved rounds after {opts['warmup']} warm-up, {torch.get_num_threads()} threads, {device}")
    seconds = time_interleaved({n: forward_of(m) for n, m in contenders.items()}, opts["repeats"], opts["warmup"], sync)
    return [{"method": name, "latency_ratio": s / seconds["base"], "seconds": s} for name, s in seconds.items()]
