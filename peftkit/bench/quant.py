"""Quantization bench: smollm2-135m at 2/3/4 bits, group 64 — RTN, NF (QLoRA start), LoftQ, ApiQ-lw, ApiQ-bw,
each at the LoRA ranks of ``ranks`` (LoftQ also at each T of ``loftq_iters``), and GPTQ (GPTQModel's solver,
no LoRA: r = 0) on the same calibration windows.

Per row: relative output error ||Y_q - Y_fp|| / ||Y_fp|| of the last hidden state on held-out
WikiText-2 test windows (taken right after the perplexity windows, so neither overlaps the other nor
the calibration text, which is wiki.valid.tokens), WikiText-2 test perplexity before any
fine-tuning (non-overlapping windows), the wall seconds the quantizer took, and the budget as stored:
  model_bytes      packed b-bit codes + fp16 scales + b-bit zero points (as GPTQ packs them; NF has none)
                   + fp16 for every tensor that is not quantized (embeddings, norms, an untied head)
  lora_bytes       A and B of every adapted projection at their stored dtype
  bits_per_weight  8 * (codes + scales + zeros + LoRA bytes) / number of quantized weights
For ApiQ-bw at the lowest bit width (``step_memory``), each rank's output is written as `peftkit quantize` writes it
and bench/packed_step.py measures, in fresh processes, the packed model's bytes in memory and the peak of a LoRA
training step on it against the float32 model's (columns packed_* / fp32_* / *_ratio, with and without gradient
checkpointing). The "fp" row is the unquantized model in the same run (16 bits per weight, everything in fp16). smollm2-135m's weights were Q4_1-quantized once before we see
them; "fp" is their dequantized fp32 copy.

options (all optional): methods, bits, group_size, calib_windows, calib_seq_len, epochs, ranks,
lora_alpha, lr_lora, lr_clip (both ApiQ variants; default: BW_LRS / LW_LRS), batch_size, ppl_windows, ppl_seq_len,
error_windows, loftq_iters, model.
"""

from __future__ import annotations

import copy
import time
from types import SimpleNamespace
from typing import Annotated, Literal, Optional

from pydantic import Field, StrictBool, field_validator

from peftkit.config.base import BenchSettings, option
from peftkit.utils.registry import BENCHES, QUANTIZERS

METHODS = ("rtn", "nf", "loftq", "apiq-lw", "apiq-bw", "gptq")
# Quick calibration has 8 windows: one per step (8 steps per block); at 4 per step ApiQ-bw 2-bit r16 reached ppl 7.7e4
# instead of 1.3e3 (docs/results/quant-quick-2bit.json vs quant-quick-apiq-batch1.json).
QUICK = dict(calib_windows=8, calib_seq_len=64, epochs=1, ppl_windows=4, ppl_seq_len=256, error_windows=2, batch_size=1)
# The quoted run (docs/results/quant-gpu-*bit.json): ~10 min per bit width on one H100, hours on 2 CPU cores.
FULL = dict(calib_windows=64, calib_seq_len=512, epochs=4, ppl_windows=20, ppl_seq_len=512, error_windows=4, batch_size=4)
BW_LRS = (5e-3, 5e-2)  # (LoRA, clipping): higher than the paper's 5e-4/5e-3 because CPU runs take far fewer steps
LW_LRS = (1e-3, 1e-2)


def _settings(quick: bool, options: dict) -> dict:
    s = dict(QUICK if quick else FULL)
    s.update(methods=list(METHODS), bits=[2, 3, 4], group_size=64, ranks=[16, 64], lora_alpha=16.0, loftq_iters=[1, 5],
             model="smollm2-135m", lr_lora=None, lr_clip=None, step_memory=True)
    s.update({k: v for k, v in (options or {}).items() if v is not None})
    return s


def _learning_rates(method: str, s: dict) -> tuple[float, float]:
    """(lr_lora, lr_clip): options win; else the CPU defaults (ApiQ-lw overfits its per-layer targets at
    the higher rates on smollm2 — 2-bit ppl 3.8e7 at 5e-3/5e-2 vs 9.8e4 at 1e-3/1e-2 in the quick setting)."""
    default = LW_LRS if method == "apiq-lw" else BW_LRS
    return (s["lr_lora"] or default[0], s["lr_clip"] or default[1])


def storage(model, result) -> dict:
    """model_bytes, lora_bytes and bits_per_weight of ``result`` applied to ``model`` (see the module docstring)."""
    quantized = {f"{name}.weight" for name in result.weights}
    n_weights = quant_bytes = 0
    for q in result.weights.values():
        out_features, in_features = q.shape
        n = out_features * in_features
        n_weights += n
        if q.kind == "none":
            quant_bytes += 2 * n
            continue
        groups = out_features * (in_features // q.group_size)
        quant_bytes += -(-n * q.bits // 8) + 2 * groups + (-(-groups * q.bits // 8) if q.zeros is not None else 0)
    seen, plain_bytes = set(), 0
    for name, tensor in model.state_dict().items():
        if name in quantized or tensor.untyped_storage().data_ptr() in seen:
            continue
        seen.add(tensor.untyped_storage().data_ptr())
        plain_bytes += 2 * tensor.numel()
    lora_bytes = sum(t.numel() * t.element_size() for pair in result.lora.values() for t in pair)
    return {"model_bytes": quant_bytes + plain_bytes, "lora_bytes": lora_bytes,
            "bits_per_weight": round(8 * (quant_bytes + lora_bytes) / max(n_weights, 1), 4)}


def _variants(method: str, s: dict) -> list[dict]:
    """The (lora_r, loftq_iters) rows of one method: GPTQ has no LoRA; LoftQ runs every T at every rank."""
    if method == "gptq":
        return [{"lora_r": 0}]
    if method == "loftq":
        return [{"lora_r": r, "loftq_iters": t} for r in s["ranks"] for t in s["loftq_iters"]]
    return [{"lora_r": r} for r in s["ranks"]]


def run(quick: bool, options: dict) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.models.aliases import resolve_model
    from peftkit.quant.pipeline import apply_quantized_weights, build_quantized_model, quantize_model
    from peftkit.paths import wikitext_root
    from peftkit.tasks.causal_lm import perplexity_of_windows
    from peftkit.utils.text_windows import (
        TEST_FILE,
        consecutive_windows,
        random_windows,
        read_text,
        token_ids,
    )

    s = _settings(quick, options)
    path = resolve_model(s["model"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # fp32 on either: errors compare exactly
    fp_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    root = wikitext_root()
    test_ids = token_ids(tokenizer, read_text(f"{root}/{TEST_FILE}"))
    ppl_windows = consecutive_windows(test_ids, s["ppl_seq_len"], s["ppl_windows"])
    error_windows = consecutive_windows(test_ids, s["ppl_seq_len"], s["error_windows"], skip=s["ppl_windows"]).to(device)
    calib = random_windows(token_ids(tokenizer, read_text(f"{root}/wiki.valid.tokens")), s["calib_windows"],
                           s["calib_seq_len"], seed=0)
    print(f"quant bench: {s['model']}, calibration {tuple(calib.shape)} (wiki.valid), ppl {tuple(ppl_windows.shape)}, "
          f"output error {tuple(error_windows.shape)} (wiki.test, disjoint), epochs {s['epochs']}", flush=True)

    def last_hidden(model):
        with torch.inference_mode():
            return model(input_ids=error_windows, output_hidden_states=True, use_cache=False).hidden_states[-1]

    y_fp = last_hidden(fp_model)
    fp_ppl = perplexity_of_windows(fp_model, ppl_windows)["ppl"]
    fp_bytes = 2 * sum({t.untyped_storage().data_ptr(): t.numel() for t in fp_model.state_dict().values()}.values())
    rows = [{"method": "fp", "bits": 16, "group_size": None, "lora_r": 0, "rel_output_error": 0.0, "ppl": fp_ppl,
             "seconds": 0.0, "bits_per_weight": 16.0, "model_bytes": fp_bytes, "lora_bytes": 0}]
    print(f"fp: ppl {fp_ppl:.2f}", flush=True)
    for bits in s["bits"]:
        for method in s["methods"]:
            for variant in _variants(method, s):
                lr_lora, lr_clip = _learning_rates(method, s)
                start = time.perf_counter()
                q = SimpleNamespace(method=method, bits=bits, group_size=s["group_size"], symmetric=False,
                                    lora_r=variant["lora_r"], lora_alpha=s["lora_alpha"], lora_targets=None,
                                    loftq_iters=variant.get("loftq_iters", 1), epochs=s["epochs"], lr_lora=lr_lora,
                                    lr_clip=lr_clip, weight_decay=0.0, aug_loss=True, batch_size=s["batch_size"], seed=0)
                calib_ids = calib if QUANTIZERS.get(method).calibrated else None
                result = quantize_model(fp_model, q, calib_ids, log=lambda line: None)
                seconds = time.perf_counter() - start
                if result.lora_r:
                    model = build_quantized_model(copy.deepcopy(fp_model), result)
                else:  # GPTQ's row: no LoRA
                    model = copy.deepcopy(fp_model)
                    apply_quantized_weights(model, result.weights)
                model.eval()
                y_q = last_hidden(model)
                row = {"method": method, "bits": bits, "group_size": s["group_size"], **variant,
                       "rel_output_error": ((y_q - y_fp).norm() / y_fp.norm()).item(),
                       "ppl": perplexity_of_windows(model, ppl_windows)["ppl"], "seconds": round(seconds, 2),
                       **storage(fp_model, result)}
                if method == "apiq-bw" and bits == min(b for b in s["bits"] if b is not None) and s["step_memory"]:
                    row.update(_step_memory(fp_model, result, tokenizer, s["model"]))
                nan_events = sum(len(b.get("nan_events", [])) for b in result.blocks)
                if nan_events:
                    row["nan_events"] = nan_events
                rows.append(row)
                label = " ".join(f"{k}={v}" for k, v in variant.items())
                width = f"{bits}-bit" if bits is not None else "unquantized"
                print(f"{method} {width} {label}: rel. output error {row['rel_output_error']:.4f}, ppl {row['ppl']:.4g}, "
                      f"{row['bits_per_weight']:.3f} bits/weight, {seconds:.1f} s", flush=True)
                del model
    return rows


def _step_memory(fp_model, result, tokenizer, model_name: str) -> dict:
    """The packed-vs-float32 memory columns of one result, through the directory `peftkit quantize` would write."""
    import tempfile

    from peftkit.bench.packed_step import packed_vs_full
    from peftkit.quant.checkpoint import save_quantized

    with tempfile.TemporaryDirectory(prefix="peftkit-quant-bench-") as out:
        save_quantized(out, fp_model, result, tokenizer)
        columns = packed_vs_full(out, model_name)
    print(f"  packed model {columns['model_bytes_ratio']:.3f}x the fp32 model's bytes; LoRA step peak "
          f"{columns['train_peak_ratio']:.3f}x ({columns['gc_train_peak_ratio']:.3f}x with gradient checkpointing)",
          flush=True)
    return columns


# ---- settings and registration -----------------------------------------------------------------------

class QuantSettings(BenchSettings):
    model: Optional[str] = option(None, "Decoder alias or directory (default smollm2-135m).", min_length=1)
    methods: Optional[list[str]] = option(
        None, "Registered quantizers (default all; gptq = GPTQModel's GPTQ solver, no LoRA).", min_length=1)
    bits: Optional[list[Optional[Literal[2, 3, 4]]]] = option(
        None, "Bit widths (2, 3, 4; null = each method's LoRA on the unquantized model).", min_length=1)
    group_size: Optional[int] = option(None, "Group size (64).", ge=1, le=65536)
    calib_windows: Optional[int] = option(None, "Calibration windows (quick 8, full 64).", ge=2, le=1_000_000)
    calib_seq_len: Optional[int] = option(None, "Tokens per calibration window (quick 64, full 512).", ge=2, le=1_048_576)
    epochs: Optional[int] = option(None, "ApiQ calibration epochs (quick 1, full 4).", ge=1, le=100_000)
    ranks: Optional[list[Annotated[int, Field(ge=1, le=65536)]]] = option(
        None, "LoRA ranks, one row per rank ([16, 64]; each 1..65536).", min_length=1)
    lora_alpha: Optional[float] = option(None, "LoRA alpha (16).", gt=0, le=1e6)
    lr_lora: Optional[float] = option(None, "ApiQ learning rate of A, B (bw 5e-3, lw 1e-3).", gt=0, le=10)
    lr_clip: Optional[float] = option(None, "ApiQ learning rate of the clipping logits (bw 5e-2, lw 1e-2).", gt=0, le=10)
    ppl_windows: Optional[int] = option(None, "Perplexity windows (quick 4, full 20).", ge=1, le=1_000_000)
    ppl_seq_len: Optional[int] = option(None, "Tokens per perplexity window (quick 256, full 512).", ge=2, le=1_048_576)
    error_windows: Optional[int] = option(None, "Held-out windows of the output error (quick 2, full 4).", ge=1, le=1_000_000)
    loftq_iters: Optional[list[Annotated[int, Field(ge=1, le=1000)]]] = option(
        None, "LoftQ alternations T, one row per T ([1, 5]; each 1..1000).", min_length=1)
    batch_size: Optional[int] = option(None, "Calibration windows per ApiQ step and per GPTQ forward (quick 1, full 4).", ge=1, le=65536)
    step_memory: Optional[StrictBool] = option(
        None, "Measure the packed model's memory and a LoRA step's peak against the float32 model, for ApiQ-bw at the "
              "lowest bit width (true; fresh processes, about a minute per rank).")

    @field_validator("methods")
    @classmethod
    def _methods(cls, value):
        problems = [QUANTIZERS.unknown(name) for name in value or ()]
        if any(problems):
            raise ValueError("; ".join(p for p in problems if p))
        return value


@BENCHES.register("quant", help="Output error, perplexity and stored bits per weight of RTN, NF, LoftQ, ApiQ-lw/bw, GPTQ at 2/3/4 bits.")
class QuantBench:
    Settings = QuantSettings
    run = staticmethod(run)
