"""A quantized model directory (what `peftkit quantize` writes) and how to load it back, packed.

  config.json + tokenizer files      the model architecture; for uniform (RTN / ApiQ) quantization also a GPTQ
                                     ``quantization_config`` (asymmetric, desc_act off, checkpoint_format gptq_v2);
                                     for NF4 (nf / LoftQ at 4 bits, group 32..4096) a bitsandbytes one (load_in_4bit,
                                     nf4, no double quantization)
  model.safetensors                  per quantized Linear its bias and
                                       uniform: the GPTQ tensors <name>.qweight/.qzeros/.scales/.g_idx (gptq_format.py)
                                       NF4: the bitsandbytes tensors <name>.weight (packed codes), .weight.absmax,
                                            .weight.quant_map, .weight.quant_state.bitsandbytes__nf4 (bnb_format.py)
                                       NF2/NF3: <name>.qweight (codes packed b bits each) and <name>.absmax, a
                                            peftkit-only layout;
                                     every other tensor (embeddings, norms, an untied lm_head) in float16
  quantization.json                  method, bits, group size, LoRA settings, per-layer formats, sizes, options
  errors.json                        per-block / per-layer errors and calibration losses
  adapter_config.json + adapter_model.safetensors   the initial LoRA in peft format, whose base is this directory

So for RTN and ApiQ outputs, transformers with GPTQ support (GPTQModel) loads the directory as the quantized model
with its LoRA (``AutoModelForCausalLM.from_pretrained(dir)``, or ``AutoPeftModelForCausalLM``); for NF4 outputs
transformers with bitsandbytes does; and peftkit loads either with every quantized Linear kept packed
(PackedLinear) — the same weights either way. NF2/NF3 outputs (and NF4 at a group size bitsandbytes has no block
for) have no format outside peftkit: their config.json has no ``quantization_config``, so transformers does not
mistake them for anything, and only peftkit loads them. quantization.json's ``storage`` and ``loads_in`` say which.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from peftkit.errors import UserError
from peftkit.quant import bnb_format
from peftkit.quant.gptq_format import from_gptq, quantization_config
from peftkit.quant.packed_linear import PackedLinear, register_lora
from peftkit.quant.result import QuantResult, lora_config
from peftkit.quant.quantized_weight import QuantizedWeight

BASE_FILE = "model.safetensors"
INFO_FILE = "quantization.json"
ERRORS_FILE = "errors.json"
FORMAT = "peftkit-quantized"
VERSION = 2
STORAGE_DTYPE = torch.float16  # GPTQ's convention for every tensor that is not packed
PACKED_PARTS = ("qweight", "qzeros", "scales", "g_idx", "absmax")  # PackedLinear's buffers
LOADS_IN = {
    "gptq": "peftkit; transformers with GPTQModel (AutoModelForCausalLM / AutoPeftModelForCausalLM)",
    "bitsandbytes": "peftkit; transformers with bitsandbytes 4-bit (AutoModelForCausalLM / AutoPeftModelForCausalLM)",
    "nf": "peftkit only: normal-float codes at these bits / group size have no format outside peftkit",
    "plain": "peftkit; transformers (16-bit weights, no quantization_config)",
}


def is_quantized_dir(path) -> bool:
    return bool(str(path)) and (Path(path) / INFO_FILE).is_file() and (Path(path) / BASE_FILE).is_file()


def stored_as_bnb(quantized: QuantizedWeight) -> bool:
    """Whether this weight is written in the bitsandbytes 4-bit layout (NF4 at a blocksize bitsandbytes has)."""
    return quantized.kind == "nf" and bnb_format.check_storable(quantized.bits, quantized.group_size,
                                                                 quantized.shape) is None


def _layer_tensors(name: str, quantized: QuantizedWeight, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The file's tensors of one quantized Linear, its bias last."""
    if quantized.kind == "none":
        tensors = {f"{name}.weight": quantized.weight.detach().to(STORAGE_DTYPE).cpu().contiguous()}
    elif stored_as_bnb(quantized):
        parts = bnb_format.to_bnb(quantized.codes, quantized.scales, quantized.group_size)
        tensors = {f"{name}.{key}": value.cpu().contiguous() for key, value in parts.items()}
    else:
        packed = PackedLinear.from_quantized(quantized)
        tensors = {f"{name}.{key}": value.cpu().contiguous() for key, value in packed.named_buffers()}
    if bias is not None:
        tensors[f"{name}.bias"] = bias.detach().to(STORAGE_DTYPE).cpu().contiguous()
    return tensors


def save_quantized(out_dir: Path, model, result: QuantResult, tokenizer=None, extra: dict | None = None) -> None:
    """Write ``result`` for ``model`` (the full-precision model it was computed from) to ``out_dir``."""
    from peft import get_peft_model
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    packed_bytes = 0
    for name, quantized in result.weights.items():
        layer = _layer_tensors(name, quantized, getattr(model.get_submodule(name), "bias", None))
        if quantized.kind != "none":
            packed_bytes += sum(t.numel() * t.element_size() for k, t in layer.items() if k != f"{name}.bias")
        tensors.update(layer)
    quantized_keys = {f"{name}.{part}" for name in result.weights for part in ("weight", "bias")}
    seen_storage = set()
    for key, value in model.state_dict().items():
        if key in quantized_keys:
            continue
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen_storage:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen_storage.add(ptr)
        tensors[key] = value.detach().to(STORAGE_DTYPE).cpu().contiguous()
    save_file(tensors, str(out_dir / BASE_FILE), metadata={"format": "pt"})

    storage = _storage(result.weights)
    config = model.config.to_dict()
    config["torch_dtype"] = config["dtype"] = "float16"
    config.pop("quantization_config", None)
    if storage == "gptq":
        config["quantization_config"] = quantization_config(result.bits, result.group_size,
                                                            bool((extra or {}).get("symmetric")), "peftkit")
    elif storage == "bitsandbytes":
        # every Linear that is not NF4 (an untied lm_head, say) must be named, or transformers makes it a Linear4bit
        skip = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in result.weights]
        config["quantization_config"] = bnb_format.quantization_config(skip)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)

    info = {"format": FORMAT, "version": VERSION, "method": result.method, "bits": result.bits,
            "group_size": result.group_size, "storage": storage, "loads_in": LOADS_IN[storage],
            "lora": {"r": result.lora_r, "alpha": result.lora_alpha, "targets": result.lora_targets},
            "layers": {name: q.describe() for name, q in result.weights.items()},
            "packed_bytes": packed_bytes,
            "model_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            **(extra or {})}
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    errors = {"blocks": result.blocks, "layers": result.layers}
    (out_dir / ERRORS_FILE).write_text(json.dumps(errors, indent=2, default=str))

    # The initial LoRA, in peft format, on the packed base just written (so its base is this directory).
    base = load_quantized_base(out_dir)
    config = lora_config(result.lora_r, result.lora_alpha, result.lora_targets)
    register_lora(config)
    peft_model = get_peft_model(base, config)
    set_lora(peft_model, result.lora)
    peft_model.save_pretrained(out_dir, safe_serialization=True)


def _storage(weights: dict[str, QuantizedWeight]) -> str:
    """gptq | bitsandbytes | nf (peftkit-only normal-float layout) | plain (16-bit)."""
    kinds = {q.kind for q in weights.values()}
    if kinds == {"uniform"}:
        return "gptq"
    if kinds == {"nf"}:
        return "bitsandbytes" if all(stored_as_bnb(q) for q in weights.values()) else "nf"
    return "plain"


@torch.no_grad()
def set_lora(peft_model, lora: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set each adapted module's A and B (modules without an entry keep B = 0)."""
    for name, module in peft_model.base_model.model.named_modules():
        if name in lora and hasattr(module, "lora_A"):
            A, B = lora[name]
            module.lora_A["default"].weight.copy_(A)
            module.lora_B["default"].weight.copy_(B)


def read_info(in_dir) -> dict:
    path = Path(in_dir) / INFO_FILE
    if not path.is_file():
        raise UserError(f"{in_dir} is not a quantized model directory (no {INFO_FILE}); make one with `peftkit quantize RECIPE`.")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); re-create the directory with `peftkit quantize`.") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{path} is not a peftkit quantization record (format {info.get('format') if isinstance(info, dict) else None!r}).")
    if info.get("version") != VERSION:
        raise UserError(f"{in_dir} was written by an older peftkit (quantized format version {info.get('version')}, "
                        f"this one reads {VERSION}: GPTQ-packed); re-create it with `peftkit quantize` on its recipe.")
    return info


QUANT_REMEDY = "Re-create it with `peftkit quantize` on its recipe."


def _read_tensors(in_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from peftkit.models.load import check_weights_file

    path = Path(in_dir) / BASE_FILE
    check_weights_file(path, f"the quantized model in {in_dir} cannot be loaded", QUANT_REMEDY)
    try:
        return load_file(str(path))
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{path} cannot be read as safetensors ({e}); re-create it with `peftkit quantize`.") from None


def _layer_parts(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors of one quantized Linear, by the key after ``<name>.`` (bitsandbytes keys have dots of their own:
    weight.absmax, weight.quant_state.bitsandbytes__nf4)."""
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _owner(key: str, layers) -> str | None:
    """The quantized Linear a file key belongs to, or None."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:end])
        if name in layers:
            return name
    return None


def _nf_parts(parts: dict[str, torch.Tensor], bits: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (out, in) and absmax (out, in / g) of an NF layer, from either layout it may be stored in."""
    if bnb_format.is_bnb(parts):
        codes, absmax, _ = bnb_format.from_bnb(parts)
        if tuple(codes.shape) != tuple(shape):
            raise ValueError(f"bitsandbytes shape {tuple(codes.shape)} is not the recorded {tuple(shape)}")
        return codes, absmax
    from peftkit.quant.packing import unpack_codes

    return unpack_codes(parts["qweight"], bits, shape), parts["absmax"]


def load_quantized_weights(in_dir) -> dict[str, QuantizedWeight]:
    """Codes, scales and zeros of every quantized Linear, unpacked (to inspect or compare them)."""
    info = read_info(in_dir)
    tensors = _read_tensors(in_dir)
    weights = {}
    for name, layer in info["layers"].items():
        parts, group, shape = _layer_parts(tensors, name), int(layer["group_size"]), tuple(layer["shape"])
        bits = None if layer["kind"] == "none" else int(layer["bits"])  # "none" layers of older files say 16
        if layer["kind"] == "uniform":
            codes, scales, zeros = from_gptq(parts, bits)
            weights[name] = QuantizedWeight("uniform", bits, group, shape, codes=codes.to(torch.uint8),
                                            scales=scales.float(), zeros=zeros.float())
        elif layer["kind"] == "nf":
            codes, absmax = _nf_parts(parts, bits, shape)
            weights[name] = QuantizedWeight("nf", bits, group, shape, codes=codes, scales=absmax)
        else:
            weights[name] = QuantizedWeight("none", None, group, shape, weight=parts["weight"])
    return weights


def _packed_module(layer: dict, parts: dict[str, torch.Tensor], dtype) -> torch.nn.Module:
    out_features, in_features = layer["shape"]
    bias = parts.get("bias")
    bias = None if bias is None else bias.to(dtype)
    if layer["kind"] == "none":
        linear = torch.nn.Linear(in_features, out_features, bias=bias is not None, dtype=dtype)
        linear.weight.data = parts["weight"].to(dtype)
        if bias is not None:
            linear.bias.data = bias
        linear.requires_grad_(False)
        return linear
    bits = int(layer["bits"])
    if layer["kind"] == "nf" and bnb_format.is_bnb(parts):
        # held as peftkit's NF buffers at run time (the same 4 bits per code, one float32 absmax per group)
        from peftkit.quant.packing import pack_codes

        codes, absmax = _nf_parts(parts, bits, layer["shape"])
        tensors = {"qweight": pack_codes(codes, bits), "absmax": absmax}
    else:
        tensors = {k: v for k, v in parts.items() if k in PACKED_PARTS}
    kind = "gptq" if layer["kind"] == "uniform" else "nf"
    return PackedLinear(kind, bits, int(layer["group_size"]), in_features, out_features, tensors, bias)


def load_quantized_base(in_dir, task_head: str = "causal_lm", num_labels: int | None = None,
                        problem_type: str | None = None, dtype=torch.float32):
    """The quantized transformers model with every quantized Linear packed (no LoRA), with the requested head.

    Built on the meta device and filled from the file, so loading never holds the full-precision model.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    from peftkit.quant.blocks import replace_module

    in_dir = Path(in_dir)
    info = read_info(in_dir)
    config = AutoConfig.from_pretrained(in_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # peftkit builds the packed layers itself
    if task_head == "causal_lm":
        auto = AutoModelForCausalLM
    elif task_head == "seq_cls":
        auto = AutoModelForSequenceClassification
        if num_labels is not None:
            config.num_labels = num_labels
        if problem_type is not None:
            config.problem_type = problem_type
    else:
        raise UserError(f"model.task_head {task_head!r} is not available on a quantized base; use causal_lm or seq_cls.")
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype)
    # safetensors maps the file: every tensor is copied out of the mapping, so that no view keeps it (and the pages
    # read while converting the unpacked tensors) in memory next to the model.
    tensors = _read_tensors(in_dir)
    quantized = info["layers"]
    try:
        for name, layer in quantized.items():
            parts = {k: v.clone() for k, v in _layer_parts(tensors, name).items()}
            replace_module(model, name, _packed_module(layer, parts, dtype))
    except (AttributeError, KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{in_dir / BASE_FILE} does not match its {INFO_FILE} ({e}); re-create it with `peftkit quantize`.") from None
    plain = {k: v.to(dtype, copy=True) for k, v in tensors.items() if _owner(k, quantized) is None}
    del tensors
    if task_head != "causal_lm":
        plain = {k: v for k, v in plain.items() if not k.startswith("lm_head.")}
    result = model.load_state_dict(plain, strict=False, assign=True)
    model.tie_weights()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    head = {k for k in model.state_dict() if k.startswith(("score.", "classifier."))}
    missing = {k for k in result.missing_keys if k.rpartition(".")[0] not in quantized} - tied - head
    if missing or result.unexpected_keys:
        raise UserError(f"{in_dir / BASE_FILE} does not match its config.json: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(result.unexpected_keys)[:5]}. Re-create it with `peftkit quantize`.")
    _materialize_meta(model)
    # peft records the model's name_or_path (set from the config when the model was built, so both are replaced) as
    # base_model_name_or_path: an adapter saved on this base finds it again from any working directory.
    model.config._name_or_path = model.name_or_path = str(in_dir.resolve())
    return model.eval()


@torch.no_grad()
def _materialize_meta(model) -> None:
    """Give what the file did not hold (a fresh task head, rotary tables, Gemma's embedding scale) real storage and its
    usual initialisation; what the file held in the same module (Gemma's embedding weight beside its scale) is kept."""
    for module in model.modules():
        own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        if any(t.is_meta for t in own.values()):
            # the storage itself: to_empty swaps the tensors inside the very Parameter objects
            loaded = {name: t.data for name, t in own.items() if not t.is_meta}
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
            for name, data in loaded.items():
                getattr(module, name).data = data


def load_quantized(in_dir, with_lora: bool = True, is_trainable: bool = False, dtype=torch.float32):
    """The quantized model of ``in_dir`` with its initial LoRA (a peft.PeftModel), in eval mode."""
    base = load_quantized_base(in_dir, dtype=dtype)
    if not with_lora:
        return base
    return load_adapter(base, in_dir, is_trainable=is_trainable).eval()


def load_adapter(base, adapter_dir, is_trainable: bool = False):
    """peft's PeftModel.from_pretrained on a packed base (peft is told how to put LoRA on a PackedLinear)."""
    from peft import LoraConfig, PeftModel

    from peftkit.models.load import check_adapter_dir

    check_adapter_dir(adapter_dir, f"the LoRA adapter in {adapter_dir} cannot be loaded",
                      "Re-create the directory that holds it.")
    config = LoraConfig.from_pretrained(str(adapter_dir))
    register_lora(config)
    return PeftModel.from_pretrained(base, str(adapter_dir), config=config, is_trainable=is_trainable)
