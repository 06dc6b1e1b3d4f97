"""A quantized model directory (what `peftkit quantize` writes) and how to load it back.

  config.json + tokenizer files       the model architecture (transformers)
  quantized_base.safetensors          per quantized Linear: <name>.qcodes (packed uint8), <name>.scales,
                                      <name>.zeros (uniform only); every other tensor (embeddings, norms,
                                      an untied lm_head) in fp32 under its usual state-dict name
  quantization.json                   method, bits, group size, LoRA settings, per-layer formats, options
  errors.json                         per-block / per-layer errors and calibration losses
  adapter_config.json + adapter_model.safetensors   the initial LoRA in peft format

``load_quantized`` rebuilds the dequantized (fake-quant) base and puts the LoRA on it with
peft.PeftModel, reproducing the outputs the quantizer measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from peftkit.errors import UserError
from peftkit.quant.pipeline import (
    QuantResult,
    apply_quantized_weights,
    build_quantized_model,
)
from peftkit.quant.quantized_weight import QuantizedWeight

BASE_FILE = "quantized_base.safetensors"
INFO_FILE = "quantization.json"
ERRORS_FILE = "errors.json"
FORMAT = "peftkit-quantized"


def is_quantized_dir(path) -> bool:
    return (Path(path) / INFO_FILE).is_file() and (Path(path) / BASE_FILE).is_file()


def save_quantized(out_dir: Path, model, result: QuantResult, tokenizer=None, extra: dict | None = None):
    """Write ``result`` for ``model`` (full precision) to ``out_dir``.

    The model is turned into the quantized model in place (to save the adapter in peft format
    without a second copy of the weights); the returned peft model is that quantized model + LoRA.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, quantized in result.weights.items():
        tensors.update(quantized.to_tensors(name))
    quantized_keys = {f"{name}.weight" for name in result.weights}
    seen_storage = set()
    for key, value in model.state_dict().items():
        if key in quantized_keys:
            continue
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen_storage:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen_storage.add(ptr)
        tensors[key] = value.detach().float().cpu().contiguous()
    save_file(tensors, str(out_dir / BASE_FILE), metadata={"format": FORMAT})
    model.config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    info = {"format": FORMAT, "version": 1, "method": result.method, "bits": result.bits,
            "group_size": result.group_size,
            "lora": {"r": result.lora_r, "alpha": result.lora_alpha, "targets": result.lora_targets},
            "layers": {name: q.describe() for name, q in result.weights.items()},
            "packed_bytes": sum(t.numel() for k, t in tensors.items() if k.endswith(".qcodes")),
            **(extra or {})}
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    errors = {"blocks": result.blocks, "layers": result.layers}
    (out_dir / ERRORS_FILE).write_text(json.dumps(errors, indent=2, default=str))
    peft_model = build_quantized_model(model, result)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return peft_model


def read_info(in_dir) -> dict:
    path = Path(in_dir) / INFO_FILE
    if not path.is_file():
        raise UserError(f"{in_dir} is not a quantized model directory (no {INFO_FILE}); make one with `peftkit quantize RECIPE`.")
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise UserError(f"{path} has format {info.get('format')!r}, expected {FORMAT!r}.")
    return info


def load_quantized_weights(in_dir) -> dict[str, QuantizedWeight]:
    from safetensors.torch import load_file

    info = read_info(in_dir)
    tensors = load_file(str(Path(in_dir) / BASE_FILE))
    return {name: QuantizedWeight.from_tensors(tensors, name, layer) for name, layer in info["layers"].items()}


def load_quantized_base(in_dir, task_head: str = "causal_lm", num_labels: int | None = None,
                        problem_type: str | None = None, dtype=torch.float32):
    """The dequantized (fake-quant) transformers model, without LoRA, with the requested head."""
    from safetensors.torch import load_file
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    in_dir = Path(in_dir)
    info = read_info(in_dir)
    config = AutoConfig.from_pretrained(in_dir)
    if task_head == "causal_lm":
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    elif task_head == "seq_cls":
        if num_labels is not None:
            config.num_labels = num_labels
        if problem_type is not None:
            config.problem_type = problem_type
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    else:
        raise UserError(f"model.task_head {task_head!r} is not available on a quantized base; use causal_lm or seq_cls.")
    tensors = load_file(str(in_dir / BASE_FILE))
    quantized_names = set(info["layers"])
    quantized_parts = {"qcodes", "scales", "zeros", "weight"}  # biases of quantized Linears stay plain tensors
    plain = {k: v for k, v in tensors.items()
             if not (k.rpartition(".")[0] in quantized_names and k.rpartition(".")[2] in quantized_parts)}
    if task_head != "causal_lm":
        plain = {k: v for k, v in plain.items() if not k.startswith("lm_head.")}
    result = model.load_state_dict(plain, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    head = {k for k in model.state_dict() if k.startswith(("score.", "classifier."))}
    missing = set(result.missing_keys) - {f"{n}.weight" for n in quantized_names} - tied - head
    if missing or result.unexpected_keys:
        raise UserError(f"{in_dir / BASE_FILE} does not match its config.json: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(result.unexpected_keys)[:5]}. Re-create it with `peftkit quantize`.")
    apply_quantized_weights(model, load_quantized_weights(in_dir))
    # peft records this as base_model_name_or_path, so a saved fine-tuned adapter finds its base again.
    model.config._name_or_path = str(in_dir)
    return model.to(dtype).eval()


def load_quantized(in_dir, with_lora: bool = True, is_trainable: bool = False):
    """The quantized model of ``in_dir`` with its initial LoRA (a peft.PeftModel), in eval mode."""
    from peft import PeftModel

    base = load_quantized_base(in_dir)
    if not with_lora:
        return base
    return PeftModel.from_pretrained(base, str(in_dir), is_trainable=is_trainable).eval()
