"""Training memory and step cost of full fine-tuning, LoRA, PaFi, HiWi and MEFT1-3 (MEFT = "MEFT (reversible)",
arXiv 2306.00477), with gradient checkpointing ("+gc" rows) as the memory saver to beat.

Per method, on the same model, batch and sequence length:
  saved_bytes       bytes of the tensors autograd keeps between forward and backward: one training forward
                    inside torch.autograd.graph.saved_tensors_hooks, each storage counted once (by
                    untyped_storage().data_ptr()), parameter and buffer storages excluded.
  peak_rss_bytes    process peak RSS (VmHWM: ru_maxrss without the parent's share) of a FRESH subprocess
                    during training steps, minus the same subprocess's peak after loading the model, allocating
                    grads + AdamW state and running one no-grad forward: what training adds on top of weights
                    and optimizer (activations, plus MEFT's transient recomputation of one layer). Two Linux details keep loading transients
                    out of it: large allocations are mmapped (MALLOC_MMAP_THRESHOLD_), so freed memory leaves
                    the RSS instead of being silently reused, and the peak counter is reset after the setup
                    (/proc/self/clear_refs "5"); where the reset is refused, the plain difference is used.
  peak_cuda_bytes   on a CUDA machine only (everything runs there, fp32): the same fresh-process measurement of the
                    GPU's peak allocated bytes (torch.cuda.max_memory_allocated after a reset) minus what was
                    allocated before the steps: activation memory as the MEFT paper measures it.
  step_seconds      median time of the trainer's own optimizer step (forward, backward, clipping, AdamW, schedule;
                    contenders alternate in this process).
  step_cpu_seconds  median process CPU seconds of the same steps (every thread together: step_cpu_seconds /
                    step_seconds is about the cores a step kept busy).
  trainable_params  parameters that receive gradients.
  step_flops        FLOPs of one forward + backward, counted by torch.utils.flop_counter (a "+gc" row includes the
                    recomputed forward); flops_per_second = step_flops / step_seconds.
  mfu               the method's FLOPs without recomputation (step_flops of its row without "+gc") / step_seconds /
                    matmul_peak_flops: the best of five 1024^2 fp32 matmuls (2·1024^3 FLOPs each) on this machine with
                    the same threads (machine limit, not a peer).
  grad_error        the worst layer's (or the head's) relative error of the trainable gradients of the method's
                    backward as it trains (MEFT's reconstruction, checkpointing's recomputation) against plain fp32
                    autograd through the same network and batch (dropout at 0 for the measurement);
                    grad_error_ref the same measure between plain fp32 and fp64 autograd (fp32's own rounding);
                    grad_error_flag when grad_error > 10 x grad_error_ref; grad_error_worst names the layer.
  segment_layers    MEFT's reversible segments (method.segment_layers; null = one segment over all reversible layers).
  stream_arithmetic MEFT's streams: fixed (the default: exact 64-bit fixed point, bit-exact reconstruction) or float
                    (the paper's arithmetic).
Rows: every method above, plus the MEFT configurations the shipped minilm GLUE recipes train when they differ from
the fully reversible default (MEFT3 with num_rev_layers 3), labelled with their options.
Depth sweep: saved_bytes for 2, 4, 8, 12 layers of a BERT-base-width model (hidden 768, random init, small
vocabulary): flat in depth for MEFT, linear for full fine-tuning and LoRA; peak RSS as well at 12 layers.
Each MEFT variant runs with its default fixed-point streams (one segment: flat in depth, exact reconstruction), and
with the paper's float streams as one segment (flat, but its fp32 reconstruction errors grow by ~1/(lambda·beta) per
layer) and in segments of 2 layers (gradients at fp32 autograd's level; 2 more saved streams per segment);
saved_vs_fewest_layers is a row's saved_bytes over the same row's at 2 layers.
MEFT's peak includes recomputing one layer in the backward pass, so its peak ratio is about 1/layers at best.
The paper's claim: MEFT's activation memory is <= 16% of full fine-tuning's (84% less).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Optional

import torch
from pydantic import StrictBool

from peftkit.bench.costs import (
    bench_device,
    build_model,
    label_of,
    make_batch,
    parse_label,
    peak_memory_in_fresh_process,
    prepare,
    saved_tensor_bytes,
    synchronize,
    to_device,
)
from peftkit.bench.harness import cpu_timed, mfu, time_interleaved, training_step
from peftkit.config.base import BenchSettings, option
from peftkit.utils.env import matmul_peak_flops
from peftkit.utils.registry import BENCHES

# "+gc": the same method with gradient checkpointing (train.gradient_checkpointing), the memory saver users already have
METHODS = ("full", "full+gc", "lora", "lora+gc", "pafi", "hiwi", "meft1", "meft2", "meft3")
DEPTH_METHODS = ("full", "full+gc", "lora", "meft1", "meft2", "meft3")
DEPTHS = (2, 4, 8, 12)
# The depth sweep's MEFT rows run with the default exact fixed-point streams and, for comparison, with the paper's
# floating-point streams: as one segment (its fp32 gradients are wrong at the bottom of a deep stack, see grad_error)
# and in reversible segments of 2 layers (method.segment_layers: right, but 2 more saved streams per segment).
DEPTH_FLOAT_ROWS = tuple({"stream_arithmetic": "float", **extra} for extra in ({}, {"segment_layers": 2}))
GRAD_NOISE_FACTOR = 10  # grad_error_flag: a row's gradient error above this many times fp32 autograd's own


def recipe_contenders() -> list[str]:
    """Labels of the MEFT configurations the shipped minilm recipes train that differ from the bench's own rows
    (all layers reversible, one segment), e.g. MEFT3 with ``num_rev_layers: 3``."""
    from peftkit.config.loader import configs_dir
    from peftkit.utils.safe_yaml import load_yaml_bounded

    labels = []
    for path in sorted(configs_dir().glob("*/meft*-minilm-*.yaml")):
        method = dict(load_yaml_bounded(path.read_text()).get("method") or {})
        name = method.pop("name")
        options = {k: v for k, v in method.items() if not (k == "r" and v == 8)}  # r 8 is the default
        label = label_of(name, options)
        if options and label not in labels:
            labels.append(label)
    return labels
SETTINGS = {  # quick: a few minutes on 2 shared cores
    True: {"batch": 8, "seq": 64, "repeats": 5, "rss_steps": 1, "sweep_batch": 2, "sweep_seq": 64},
    False: {"batch": 32, "seq": 128, "repeats": 5, "rss_steps": 3, "sweep_batch": 8, "sweep_seq": 128},
}


# ---- measuring (saved bytes, fresh-process peaks and the contenders are bench.costs') -----------------------
def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def step_flops(method, model, batch: dict) -> tuple[int, str]:
    """(FLOPs of one training step's forward and backward, how they were counted). torch's counter sees every op of
    the step (recomputation included); MEFT's backward calls autograd inside autograd, which the counter cannot
    follow, so there the forward is counted and tripled (the usual 1 forward + 2 backward convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter:
            method.compute_loss(model, batch).backward()
        return counter.get_total_flops(), "counted"
    except RuntimeError:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            method.compute_loss(model, batch)
        return 3 * counter.get_total_flops(), "forward x3"
    finally:
        model.zero_grad(set_to_none=True)


# ---- gradient error of the method's backward ------------------------------------------------------------
class _NoDropout:
    """Context: every nn.Dropout of ``model`` at p = 0 (modules stay in training mode, so checkpointing and the
    reversible backward run as in training, but both sides of a comparison compute the same function)."""

    def __init__(self, model):
        self.modules = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]

    def __enter__(self):
        self.saved = [m.p for m in self.modules]
        for m in self.modules:
            m.p = 0.0

    def __exit__(self, *exc):
        for m, p in zip(self.modules, self.saved):
            m.p = p


class _PlainAutograd:
    """Context: ``model`` trains with ordinary autograd: MEFT's reversible backward and gradient checkpointing off."""

    def __init__(self, method, model):
        self.method, self.model = method, model

    def __enter__(self):
        from peftkit.methods.meft import MEFTEncoder

        self.encoders = [m for m in self.model.modules() if isinstance(m, MEFTEncoder)]
        for encoder in self.encoders:
            encoder.reversible = False
        self.checkpointing = bool(getattr(self.model, "is_gradient_checkpointing", False))
        if self.checkpointing:
            self.model.gradient_checkpointing_disable()

    def __exit__(self, *exc):
        for encoder in self.encoders:
            encoder.reversible = True
        if self.checkpointing:
            self.method.enable_gradient_checkpointing(self.model)


def _grads_by_group(model, batch) -> dict[str, list[torch.Tensor]]:
    """Trainable gradients of one loss.backward(), grouped by layer ("layer 3") or "head" (everything else)."""
    import re

    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            match = re.search(r"\.(?:layer|layers|adapters)\.(\d+)\.", name)
            key = f"layer {match.group(1)}" if match else "head"
            groups.setdefault(key, []).append(torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return groups


def _relative_errors(got: dict, want: dict) -> dict[str, float]:
    out = {}
    for key, wants in want.items():
        diff = sum(float((g.double() - w.double()).norm() ** 2) for g, w in zip(got[key], wants)) ** 0.5
        norm = sum(float(w.double().norm() ** 2) for w in wants) ** 0.5
        out[key] = diff / max(norm, 1e-300)
    return out


def gradient_errors(method, model, batch: dict) -> dict:
    """How far the method's backward is from plain autograd, next to plain fp32 autograd's own rounding.

    grad_error: the largest, over layers (and the head), of ||g - g_ref|| / ||g_ref|| where g are the trainable
    gradients of the model as it trains (reversible backward, checkpointing) and g_ref those of plain fp32
    autograd through the same network, same batch. grad_error_ref: the same measure between plain fp32 and plain
    fp64 autograd, the rounding every fp32 run has. grad_error_flag: grad_error > GRAD_NOISE_FACTOR x that.
    Dropout is set to 0 for the measurement (both sides compute one function)."""
    model.train()
    with _NoDropout(model):
        got = _grads_by_group(model, batch)
        with _PlainAutograd(method, model):
            plain = _grads_by_group(model, batch)
        double = copy.deepcopy(model).double()
        with _NoDropout(double), _PlainAutograd(method, double):
            exact = _grads_by_group(double, batch)
        del double
    error, reference = _relative_errors(got, plain), _relative_errors(plain, exact)
    worst, worst_ref = max(error.values()), max(reference.values())
    return {"grad_error": worst, "grad_error_ref": worst_ref,
            "grad_error_flag": bool(worst > GRAD_NOISE_FACTOR * worst_ref),
            "grad_error_worst": max(error, key=error.get)}


# ---- the bench ---------------------------------------------------------------------------------------
def fresh_peaks(spec: dict, settings: dict, label: str, methods=METHODS) -> dict:
    """method -> peak_memory_in_fresh_process(...) for every method of the bench, one fresh interpreter each."""
    peaks = {}
    for name in methods:
        print(f"{label} peak memory (fresh process): {name}", flush=True)
        peaks[name] = peak_memory_in_fresh_process({**spec, "method": name, "steps": settings["rss_steps"],
                                                    "threads": torch.get_num_threads()})
    return peaks


def main_rows(settings: dict, model_name: str) -> list[dict]:
    device = bench_device()
    spec = {"model": model_name, "batch": settings["batch"], "seq": settings["seq"], "seed": 0, "device": str(device)}
    labels = [*METHODS, *recipe_contenders()]
    peaks = fresh_peaks(spec, settings, "[memory]", labels)  # first, while this process is still small
    peak_rss = {name: p["peak_rss_bytes"] for name, p in peaks.items()}
    base = build_model(spec).to(device)
    batch = to_device(make_batch(base.config.vocab_size, settings["batch"], settings["seq"]), device)
    contenders, flops, grad_errors = {}, {}, {}
    for name in labels:
        method, model = prepare(name, copy.deepcopy(base))
        model.train()
        flops[name] = step_flops(method, model, batch)
        print(f"[memory] gradient error: {name}", flush=True)
        grad_errors[name] = gradient_errors(method, model, batch)
        contenders[name] = (model, training_step(method, model))
    peak = matmul_peak_flops("fp32")  # the machine limit in the dtype these steps run in (fp32)
    saved = {}
    for name, (model, _) in contenders.items():
        print(f"[memory] saved bytes: {name}", flush=True)
        torch.manual_seed(0)
        saved[name] = saved_tensor_bytes(model, batch)
    # Step time: contenders alternate (one step each per round, the order rotating by round) so that load changes on
    # a shared machine hit all of them alike; the median of `repeats` rounds after one warm-up round.
    print("[memory] step time", flush=True)
    cpu_spans = {name: [] for name in contenders}
    medians = time_interleaved({name: cpu_timed(lambda step=step: step(batch), cpu_spans[name])
                                for name, (_, step) in contenders.items()},
                               repeats=settings["repeats"], warmup=1, sync=lambda: synchronize(device))
    times = {name: [seconds] for name, seconds in medians.items()}
    cpu_seconds = {name: statistics.median(spans[1:]) for name, spans in cpu_spans.items()}  # after the warm-up round
    rows = []
    for name, (model, _) in contenders.items():
        rows.append({"method": name, "layers": base.config.num_hidden_layers, "hidden": base.config.hidden_size,
                     "batch": settings["batch"], "seq": settings["seq"], "saved_bytes": saved[name],
                     "peak_rss_bytes": peak_rss[name], "step_seconds": statistics.median(times[name]),
                     "step_cpu_seconds": cpu_seconds[name],
                     "trainable_params": trainable_params(model),
                     "saved_ratio_vs_full": saved[name] / saved["full"],
                     "peak_rss_ratio_vs_full": peak_rss[name] / peak_rss["full"] if peak_rss["full"] > 0 else None,
                     "step_ratio_vs_full": statistics.median(times[name]) / statistics.median(times["full"]),
                     "step_flops": flops[name][0], "flops_counted": flops[name][1],
                     "flops_per_second": flops[name][0] / statistics.median(times[name]),
                     "mfu": mfu(flops[name.split("+")[0]][0], statistics.median(times[name]), peak),
                     "matmul_peak_flops": peak, **_cuda_columns(peaks, name), "device": device.type,
                     **_meft_columns(name), **grad_errors[name]})
    return rows


def _meft_columns(label: str) -> dict:
    """segment_layers and stream_arithmetic of a MEFT row (None for other methods)."""
    name, options = parse_label(label)
    if not name.startswith("meft"):
        return {"segment_layers": None, "stream_arithmetic": None}
    return {"segment_layers": options.get("segment_layers"), "stream_arithmetic": options.get("stream_arithmetic", "fixed")}


def _cuda_columns(peaks: dict, name: str) -> dict:
    """peak_cuda_bytes (+ ratio to full) where the fresh process measured the GPU; nothing on the CPU."""
    cuda = peaks.get(name, {}).get("peak_cuda_bytes")
    if cuda is None:
        return {}
    full = peaks["full"]["peak_cuda_bytes"]
    return {"peak_cuda_bytes": cuda, "peak_cuda_ratio_vs_full": cuda / full if full else None}


def depth_rows(settings: dict) -> list[dict]:
    device = bench_device()
    rows = []
    labels = [*DEPTH_METHODS, *(label_of(name, extra) for extra in DEPTH_FLOAT_ROWS
                                for name in DEPTH_METHODS if name.startswith("meft"))]
    shallowest: dict[str, int] = {}
    for layers in DEPTHS:
        config = {"hidden_size": 768, "num_hidden_layers": layers, "num_attention_heads": 12,
                  "intermediate_size": 3072, "vocab_size": 1024, "max_position_embeddings": 512}
        spec = {"model": "config", "config": config, "batch": settings["sweep_batch"], "seq": settings["sweep_seq"],
                "device": str(device)}
        # peak memory too at full BERT-base depth, where one layer is 1/12 of the stack
        peaks = fresh_peaks(spec, settings, f"[memory] depth {layers}:", labels) if layers == max(DEPTHS) else {}
        peak_rss = {name: p["peak_rss_bytes"] for name, p in peaks.items()}
        base = build_model(spec).to(device)
        batch = to_device(make_batch(base.config.vocab_size, settings["sweep_batch"], settings["sweep_seq"]), device)
        full_bytes = None
        for name in labels:
            print(f"[memory] depth {layers}: {name}", flush=True)
            method, model = prepare(name, copy.deepcopy(base))
            model.train()
            torch.manual_seed(0)
            saved = saved_tensor_bytes(model, batch)
            full_bytes = saved if name == "full" else full_bytes
            shallowest.setdefault(name, saved)
            # the gradient error where the backward differs from autograd's: MEFT's reconstruction
            errors = gradient_errors(method, model, batch) if name.startswith("meft") else {}
            rows.append({"method": name, "layers": layers, "hidden": 768, "batch": settings["sweep_batch"],
                         "seq": settings["sweep_seq"], "saved_bytes": saved, "peak_rss_bytes": peak_rss.get(name),
                         "step_seconds": None, "step_cpu_seconds": None, "trainable_params": trainable_params(model),
                         "saved_ratio_vs_full": saved / full_bytes,
                         "saved_vs_fewest_layers": saved / shallowest[name],
                         "peak_rss_ratio_vs_full": peak_rss[name] / peak_rss["full"] if peak_rss.get("full") else None,
                         **_cuda_columns(peaks, name), "device": device.type, **_meft_columns(name), **errors})
            del model
    return rows


def run(quick: bool, options: dict) -> list[dict]:
    settings = {**SETTINGS[bool(quick)], **{k: v for k, v in options.items() if k in SETTINGS[True]}}
    model_name = options.get("model", "minilm-l6")
    rows = main_rows(settings, model_name)
    if not options.get("skip_depth"):
        rows += depth_rows(settings)
    return rows


# ---- settings and registration -----------------------------------------------------------------------

class MemorySettings(BenchSettings):
    model: Optional[str] = option(None, "Model alias or directory (default minilm-l6).", min_length=1)
    batch: Optional[int] = option(None, "Rows per training batch (quick 8, full 32).", ge=1, le=65536)
    seq: Optional[int] = option(None, "Tokens per row (quick 64, full 128).", ge=2, le=1_048_576)
    repeats: Optional[int] = option(None, "Timed steps per contender (5).", ge=1, le=10_000)
    rss_steps: Optional[int] = option(None, "Steps of each fresh-process peak measurement (quick 1, full 3).", ge=1, le=10_000)
    sweep_batch: Optional[int] = option(None, "Batch of the depth sweep (quick 2, full 8).", ge=1, le=65536)
    sweep_seq: Optional[int] = option(None, "Tokens per row in the depth sweep (quick 64, full 128).", ge=2, le=1_048_576)
    skip_depth: Optional[StrictBool] = option(None, "Skip the depth sweep.")


@BENCHES.register("memory", help="Activation bytes, peak RSS and step time: full, LoRA, MEFT1-3, at one size and over depth.")
class MemoryBench:
    Settings = MemorySettings
    run = staticmethod(run)
