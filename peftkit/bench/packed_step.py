"""Memory of a quantized model at run time: the packed model against the full-precision one, each in a fresh process.

For one `peftkit quantize` output and the model it came from, a fresh interpreter (so no other work is in its
memory) measures:
  model_bytes_in_memory  bytes of the loaded model's tensors (each storage once), LoRA excluded
  train_peak_bytes       peak RSS over loading the model, putting LoRA on it and a few LoRA training steps
                         (AdamW), minus the interpreter's RSS before loading: the whole footprint of fine-tuning it
The packed side loads the output as peftkit fine-tunes it (every quantized Linear packed, the rest in ``dtype``);
the full-precision side loads the source model in float32 with a LoRA of the same rank on the same modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _tensor_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in seen:
            seen.add(pointer)
            total += tensor.untyped_storage().nbytes()
    return total


def lora_of(spec: dict):
    """The LoRA config of a step: the quantize output's rank (or ``spec['lora_r']``), alpha and modules."""
    from peftkit.quant.checkpoint import read_info
    from peftkit.quant.result import lora_config

    lora = read_info(spec["quant_dir"])["lora"]
    return lora_config(spec.get("lora_r") or lora["r"], lora["alpha"], lora["targets"])


def warm_up_peft() -> None:
    """peft imports its optional backends (GPTQModel, when installed) the first time it wraps a model: do that on a
    throw-away module first, so the libraries' memory is in the baseline and not counted as the model's."""
    import torch
    from peft import get_peft_model

    from peftkit.quant.result import lora_config

    get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), lora_config(1, 1.0, ["0"]))


def load_side(spec: dict, config):
    """The base of ``spec['side']``: the packed quantize output (unpacked into ``spec['dtype']``), or the float32
    model it came from."""
    import torch

    if spec["side"] == "packed":
        from peftkit.quant.checkpoint import load_quantized_base
        from peftkit.quant.packed_linear import register_lora

        model = load_quantized_base(spec["quant_dir"], dtype=getattr(torch, spec.get("dtype", "float32")))
        register_lora(config)
        return model
    from transformers import AutoModelForCausalLM

    from peftkit.models.aliases import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model(spec["source_model"]), dtype=torch.float32)


def with_lora(model, config, gradient_checkpointing: bool):
    """(peft model in train mode, AdamW over its LoRA): the base frozen, the AdamW kernel the trainer picks."""
    import torch
    from peft import get_peft_model

    from peftkit.train.trainer import adamw_kernel

    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, config)
    model.train()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    return model, torch.optim.AdamW(groups, lr=1e-4, **adamw_kernel(groups))


def step_child(spec: dict) -> dict:
    """Runs in a fresh interpreter (see module doc)."""
    import torch

    from peftkit.bench.costs import _maxrss_bytes, _reset_peak_rss

    torch.set_num_threads(spec.get("threads", 1))
    torch.manual_seed(0)
    config = lora_of(spec)
    warm_up_peft()
    _reset_peak_rss()
    baseline = _maxrss_bytes()
    model = load_side(spec, config)
    model_bytes = _tensor_bytes(model)
    model, optimizer = with_lora(model, config, bool(spec.get("gradient_checkpointing")))
    ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]),
                        generator=torch.Generator().manual_seed(0))
    seconds, cpu_seconds = [], []
    for _ in range(spec.get("steps", 2)):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    # step_cpu_seconds: this process's CPU time per step, which other jobs on a shared machine do not lengthen the
    # way they lengthen the wall-clock step_seconds (with one thread the two agree on an idle machine)
    return {"model_bytes_in_memory": model_bytes, "train_peak_bytes": _maxrss_bytes() - baseline,
            "loss": float(loss), "step_seconds": seconds, "step_cpu_seconds": cpu_seconds}


def measure(spec: dict, timeout: float = 1800) -> dict:
    """step_child(spec) in a fresh interpreter."""
    code = ("import json, sys; from peftkit.bench.packed_step import step_child; "
            "print('STEP ' + json.dumps(step_child(json.loads(sys.argv[1]))))")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_THRESHOLD_": "262144"}  # big tensors are mmapped: freed memory leaves the RSS
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("STEP ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"training-step memory subprocess ({spec['side']}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][5:])


def packed_vs_full(quant_dir, source_model: str, batch: int = 1, seq: int = 128, steps: int = 2,
                   dtype: str | None = None, threads: int = 1) -> dict:
    """Columns for a quant bench row: the packed model and its LoRA step against the float32 model's, each without
    and with gradient checkpointing (which removes most activations and leaves the weights to dominate). The packed
    side unpacks into ``dtype``: by default bfloat16 where this machine's bf16 kernels run, else float32."""
    if dtype is None:
        from peftkit.utils.env import bf16_or_fp32_dtype_name

        dtype = bf16_or_fp32_dtype_name()
    spec = {"quant_dir": str(quant_dir), "source_model": source_model, "batch": batch, "seq": seq, "steps": steps,
            "threads": threads}
    runs = {(side, gc): measure({**spec, "side": side, "dtype": dtype, "gradient_checkpointing": gc})
            for side in ("packed", "full") for gc in (False, True)}
    packed, full = runs[("packed", False)], runs[("full", False)]
    return {"packed_model_bytes": packed["model_bytes_in_memory"], "fp32_model_bytes": full["model_bytes_in_memory"],
            "model_bytes_ratio": packed["model_bytes_in_memory"] / full["model_bytes_in_memory"],
            "packed_train_peak_bytes": packed["train_peak_bytes"], "fp32_train_peak_bytes": full["train_peak_bytes"],
            "train_peak_ratio": packed["train_peak_bytes"] / full["train_peak_bytes"],
            "packed_gc_train_peak_bytes": runs[("packed", True)]["train_peak_bytes"],
            "fp32_gc_train_peak_bytes": runs[("full", True)]["train_peak_bytes"],
            "gc_train_peak_ratio": runs[("packed", True)]["train_peak_bytes"] / runs[("full", True)]["train_peak_bytes"],
            "train_step": f"LoRA (rank as quantized), {steps} AdamW steps of {batch}x{seq} tokens; packed model: "
                          f"unpacked tensors in {dtype}, fp32 model: float32; gc = gradient checkpointing on both"}
