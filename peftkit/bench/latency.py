"""Inference latency: base vs merged PaFi / HiWi (weight, bias) / LoRA vs unmerged LoRA and Houlsby adapters.

The claim under test (PaFi/HiWi paper): once merged, these methods leave a plain pretrained-architecture
model, so their latency ratio to the base is 1.00, while an unmerged LoRA adds work to every forward, and so do
classic Houlsby adapters, which cannot be merged at all: a bottleneck (Linear d->r, the model's activation, Linear
r->d, added to its input) after the attention output projection and after the FFN output projection of every layer,
the latency cost HiWi and PaFi were designed to avoid. LoRA merged into the weights is timed too: a merged LoRA
is again the plain architecture, so it should cost what PaFi and HiWi cost.
Every adapter gets non-zero values first, so merging writes real changes into the weights. A second copy of
the unmodified base is timed as one more contender: its distance from 1.00 is the noise of the measurement.

Method (docs/benchmarks.md): one process, one fixed batch of random token ids, model.eval() and
torch.inference_mode(); contenders are interleaved — each round times one forward of each, in a
rotated order — so that machine drift hits all alike; median over >= 20 timed rounds after warm-up.

Options (all optional): model (alias or directory, default minilm-l6), batch_size, seq_len,
repeats, warmup, rho (PaFi), r (HiWi), lora_r, adapter_r (Houlsby bottleneck), threads, device, seed, and models: directories written by
``peftkit export --merge`` to time, loaded as a deployer would (plain transformers ``from_pretrained``), in place of
the synthetic contenders; each row then also names the export's method.
"""

from __future__ import annotations

import copy
from typing import Literal, Optional

from peftkit.bench.harness import time_interleaved
from peftkit.config.base import BenchSettings, option
from peftkit.config.schema import like_train
from peftkit.utils.registry import BENCHES


def add_houlsby_adapters(model, r: int):
    """Houlsby et al. (2019) adapters, in place: after the attention output projection and after the FFN output
    projection of every layer, y -> y + up(act(down(y))), before the residual sum and LayerNorm; the bottleneck is
    MEFT's (peftkit.methods.meft.Adapter) with the model's activation. Returns the model."""
    from torch import nn
    from transformers.activations import ACT2FN

    from peftkit.methods.meft import Adapter
    from peftkit.models.families import family_of, get_path, layers_of

    class ProjectionThenAdapter(nn.Module):
        def __init__(self, projection, adapter):
            super().__init__()
            self.projection, self.adapter = projection, adapter

        def forward(self, x):
            y = self.projection(x)
            return y + self.adapter(y)

    family = family_of(model)
    activation = ACT2FN[getattr(model.config, "hidden_act", "gelu")]
    for layer in layers_of(model):
        for path in (family.attention_output, family.ffn_out):
            parent_path, _, attr = path.rpartition(".")
            parent = get_path(layer, parent_path) if parent_path else layer
            projection = getattr(parent, attr)
            adapter = Adapter(projection.out_features, r, activation, std=1e-3).to(projection.weight.dtype)
            setattr(parent, attr, ProjectionThenAdapter(projection, adapter))
    return model


def build_contenders(base, opts: dict) -> dict:
    """name -> model; each adapter is given non-zero trained-looking values before merging."""
    import torch

    from peftkit.methods import create_method

    def perturb(params, scale):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * scale)

    # The base is a deep copy too, so that every contender's tensors were allocated the same way
    # (from_pretrained's may be memory-mapped from the checkpoint file).
    contenders = {"base": copy.deepcopy(base)}

    pafi = create_method("pafi", rho=opts["rho"])
    model = pafi.prepare(copy.deepcopy(base))
    perturb([p for n, p in model.named_parameters() if n.endswith(".values")], 0.02)
    contenders["pafi (merged)"] = pafi.merge(model)

    for target in ("weight", "bias"):
        hiwi = create_method("hiwi", target=target, r=opts["r"])
        model = hiwi.prepare(copy.deepcopy(base))
        perturb([p for n, p in model.named_parameters() if n.endswith(".up")], 0.02)
        contenders[f"hiwi-{target} (merged)"] = hiwi.merge(model)

    lora = create_method("lora", r=opts["lora_r"])
    model = lora.prepare(copy.deepcopy(base))
    perturb([p for n, p in model.named_parameters() if "lora_B" in n], 0.02)
    contenders["lora (unmerged)"] = model
    contenders["lora (merged)"] = lora.merge(copy.deepcopy(model))

    houlsby = add_houlsby_adapters(copy.deepcopy(base), opts["adapter_r"])
    perturb([p for n, p in houlsby.named_parameters() if ".adapter.up." in n], 0.02)
    contenders["houlsby-adapter (unmerged)"] = houlsby
    # A second, identical copy of the base: its ratio is the bench's own noise floor. Any merged method within
    # that distance of 1.00 costs nothing measurable (on 2 shared cores identical copies differ by a few %).
    contenders["base (identical copy)"] = copy.deepcopy(base)
    return contenders


def exported_contenders(dirs: list[str], base) -> dict:
    """name -> model for each merged export directory, loaded by plain transformers; checked against the base."""
    import json
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification

    from peftkit.errors import UserError
    from peftkit.artifacts.load import EXPORT_INFO_FILE
    from peftkit.models.load import check_model_dir

    models = {}
    for text in dirs:
        directory = Path(text).expanduser()
        info_path = directory / EXPORT_INFO_FILE
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        if (info.get("export") or {}).get("format") != "transformers":
            raise UserError(f"latency setting models: {directory} is not a merged export (no {EXPORT_INFO_FILE} with "
                            f"format transformers). Write one with `peftkit export RUN --out DIR --merge`.")
        check_model_dir(directory, any_model_type=True)  # pickles, truncated files and NaN refused unopened
        model = AutoModelForSequenceClassification.from_pretrained(directory)
        if type(model) is not type(base) or model.config.num_labels != base.config.num_labels:
            raise UserError(f"latency setting models: {directory} is a {type(model).__name__} with "
                            f"{model.config.num_labels} labels, the base a {type(base).__name__} with "
                            f"{base.config.num_labels}; time exports of the model given by the setting model.")
        # a deep copy, as the base is one: tensors allocated alike, not memory-mapped from the checkpoint file
        models[f"{info.get('method', 'export')} export ({directory.name})"] = copy.deepcopy(model)
    return models


def run(quick: bool, options: dict) -> list[dict]:
    import torch
    from transformers import AutoModelForSequenceClassification

    from peftkit.models.aliases import resolve_model

    opts = {"model": "minilm-l6", "batch_size": 8 if quick else 32, "seq_len": 64 if quick else 128,
            "repeats": 20, "warmup": 3, "rho": 0.005, "r": 8, "lora_r": 8, "adapter_r": 64, "threads": None,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "seed": 0, **(options or {})}
    if opts["threads"]:
        torch.set_num_threads(int(opts["threads"]))
    torch.manual_seed(opts["seed"])
    device = torch.device(opts["device"])
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model(opts["model"]), num_labels=2,
                                                              dtype=torch.float32)
    if opts.get("models"):
        contenders = {"base": copy.deepcopy(base), **exported_contenders(opts["models"], base),
                      "base (identical copy)": copy.deepcopy(base)}
    else:
        contenders = build_contenders(base, opts)
    contenders = {name: m.to(device).eval() for name, m in contenders.items()}

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


# ---- settings and registration -----------------------------------------------------------------------

class LatencySettings(BenchSettings):
    model: Optional[str] = option(None, "Model alias or directory (default minilm-l6).", min_length=1)
    batch_size: like_train("batch_size") = option(None, "Rows per forward (quick 8, full 32).")
    seq_len: Optional[int] = option(None, "Tokens per row (quick 64, full 128).", ge=2, le=1_048_576)
    repeats: Optional[int] = option(None, "Interleaved timed rounds (20).", ge=1, le=100_000)
    warmup: Optional[int] = option(None, "Untimed rounds first (3).", ge=0, le=100_000)
    rho: Optional[float] = option(None, "PaFi's trainable fraction (0.005).", gt=0, lt=1)
    r: Optional[int] = option(None, "HiWi bottleneck (8).", ge=1, le=65536)
    lora_r: Optional[int] = option(None, "LoRA rank (8).", ge=1, le=65536)
    adapter_r: Optional[int] = option(None, "Bottleneck of the Houlsby adapters (64).", ge=1, le=65536)
    threads: like_train("threads") = option(None, "torch threads (torch's default).")
    device: Optional[Literal["cpu", "cuda"]] = option(None, "Device (cuda when available).")
    seed: like_train("seed") = option(None, "Seed of the inputs and adapters (0).")
    models: Optional[list[str]] = option(None, "Merged export directories (peftkit export --merge) to time against the "
                                               "base instead of the synthetic contenders.", min_length=1)


@BENCHES.register("latency", help="Inference latency of base vs merged PaFi/HiWi/LoRA vs unmerged LoRA and Houlsby adapters, with an identical copy as noise reference.")
class LatencyBench:
    Settings = LatencySettings
    run = staticmethod(run)
