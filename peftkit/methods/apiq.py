"""LoRA fine-tuning on a quantized base made by `peftkit quantize` (ApiQ, LoftQ, QLoRA-style NF, RTN).

model.name is the quantize output directory. ``load_base`` loads its base with every quantized Linear kept packed
(PackedLinear: the weight is unpacked per matmul, in forward and again in backward, never stored unpacked);
``prepare`` puts peft LoRA on it with the factors the quantizer initialised (ApiQ / LoftQ: calibrated A and B;
RTN / NF: B = 0) and leaves only LoRA (and a task head, if any) trainable — the quantized base stays frozen.
``save`` / ``load`` use peft's adapter format, whose base is the quantize output directory; for GPTQ-packed
outputs (RTN, ApiQ, with GPTQModel) and NF4 outputs (with bitsandbytes) peft's AutoPeftModel loads a saved adapter
outside peftkit too.
``model.dtype`` is the dtype of everything that is not packed (embeddings, norms, LoRA inputs): bfloat16 keeps the
model smallest in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from peftkit.config import MethodArgs, option
from peftkit.errors import UserError
from peftkit.methods.peft_backed import PeftBackedMethod, head_modules
from peftkit.utils.registry import METHODS


class QuantizedLoRAOptions(MethodArgs):
    dropout: float = option(0.0, "Dropout on the LoRA input during fine-tuning.", ge=0, lt=1)
    init: Literal["quantized", "zero"] = option(
        "quantized", "'quantized' = start from the A, B the quantizer wrote; 'zero' = fresh LoRA (B = 0).")


@METHODS.register("apiq", help="LoRA on a quantized base made by `peftkit quantize`.")
class QuantizedLoRA(PeftBackedMethod):
    """The quantize output directory is the base: ``load_base`` records it, ``prepare`` reads its LoRA."""

    name = "apiq"
    heads = frozenset({"seq_cls", "causal_lm"})
    needs = ("quantizable",)  # the base is a `peftkit quantize` output
    Options = QuantizedLoRAOptions
    can_merge = True  # into the unpacked weights: a full-precision model (see merge)
    # The packed base is ~1/6 of the float model, so activations dominate the step; and checkpointing costs the packed
    # step little: the forward's rerun keeps its unpacked weights for the backward (packed_linear._UnpackedMatmul).
    checkpoints_by_default = True
    unmerged_export = "peftkit"  # the quantize output travels as base/; peft loads its GPTQ and NF4 forms too
    quant_dir: Path | None = None

    def load_base(self, model_options, task_head="causal_lm", num_labels=None, problem_type=None):
        from peftkit.quant.checkpoint import is_quantized_dir, load_quantized_base

        quant_dir = Path(model_options.name)
        if not is_quantized_dir(quant_dir):
            raise UserError(f"method apiq needs model.name to be a `peftkit quantize` output directory; "
                            f"{quant_dir} is not one (no quantization.json / model.safetensors).")
        dtype_name = getattr(model_options, "dtype", "float32")
        from peftkit.models.load import torch_dtype

        model = load_quantized_base(quant_dir, task_head, num_labels, problem_type, torch_dtype(dtype_name))
        if task_head == "seq_cls" and model.config.pad_token_id is None:
            model.config.pad_token_id = model.config.eos_token_id  # decoders need it to find the last token
        self.quant_dir = quant_dir
        return model

    def prepare(self, model):
        from peft import (
            get_peft_model,
            get_peft_model_state_dict,
            set_peft_model_state_dict,
        )
        from safetensors.torch import load_file

        from peftkit.models.load import check_adapter_dir
        from peftkit.quant.checkpoint import read_info
        from peftkit.quant.packed_linear import register_lora
        from peftkit.quant.result import lora_config

        options, quant_dir = self.options, self.quant_dir
        if quant_dir is None:
            raise UserError("method apiq: the base model was not loaded from a quantize output directory (use load_base).")
        lora = read_info(quant_dir)["lora"]
        heads = head_modules(model)
        for p in model.parameters():  # the quantized base stays frozen; peft unfreezes LoRA and the head
            p.requires_grad_(False)
        config = lora_config(lora["r"], lora["alpha"], lora["targets"], heads, options.dropout)
        register_lora(config)
        peft_model = get_peft_model(model, config)
        if options.init == "quantized":
            check_adapter_dir(quant_dir, f"the LoRA of the quantize output {quant_dir} cannot be loaded",
                              "Re-create it with `peftkit quantize` on its recipe.")
            state = load_file(str(Path(quant_dir) / "adapter_model.safetensors"))
            # A fresh task head is not in the quantizer's adapter: it keeps its own initialisation.
            current = get_peft_model_state_dict(peft_model)
            state = {**{k: v for k, v in current.items() if k not in state}, **state}
            result = set_peft_model_state_dict(peft_model, state)
            if getattr(result, "unexpected_keys", None):
                raise UserError(f"the LoRA in {quant_dir} does not fit the model: unexpected {result.unexpected_keys[:3]}")
        return peft_model

    def fsdp_units(self, model):
        """Under FSDP each packed Linear is a unit of its own: its packed tensors (integer codes, float scales) are
        buffers, which FSDP would replicate, so they become frozen Parameters and are sharded like any weight (same
        state-dict names); gathered by the unit's own hooks before its forward and again before its backward (which
        unpacks the weight a second time), and never cast by a mixed-precision policy."""
        from torch import nn

        from peftkit.quant.packed_linear import PackedLinear

        units = [module for module in model.modules() if isinstance(module, PackedLinear)]
        for module in units:
            for name, tensor in list(module._buffers.items()):
                if tensor is not None:
                    del module._buffers[name]
                    module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        return units

    def merge(self, model):
        """LoRA folded into the unpacked weights: a plain model of the base architecture, no longer low-bit (the
        weights are the quantized ones plus the LoRA update, in full precision)."""
        import torch

        from peftkit.quant.blocks import replace_module
        from peftkit.quant.packed_linear import PackedLinear

        inner = model.get_base_model()
        dtype = inner.get_input_embeddings().weight.dtype  # the dtype the unpacked tensors were loaded in
        for name, module in list(inner.named_modules()):
            packed = getattr(module, "base_layer", None)
            if not isinstance(packed, PackedLinear):
                continue
            with torch.no_grad():
                weight = packed.unpack(torch.float32)
                for adapter in module.active_adapters:
                    A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                    weight += (B.float() @ A.float()) * module.scaling[adapter]
                linear = torch.nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None)
                linear.weight.copy_(weight)
                if packed.bias is not None:
                    linear.bias.copy_(packed.bias)
            replace_module(inner, name, linear.to(dtype))
        return model.merge_and_unload()

    def load(self, base_model, in_dir):
        from peftkit.quant.checkpoint import load_adapter

        return load_adapter(base_model, in_dir)
