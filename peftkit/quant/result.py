"""What a quantizer produced (``QuantResult``) and the peft LoRA it is worn with: what the checkpoint writer and the
fine-tuning method need, without the driver that computes it (pipeline.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from peftkit.quant.quantized_weight import QuantizedWeight


@dataclass
class QuantResult:
    """Everything a quantized checkpoint holds, keyed by full module name (e.g. model.layers.0.mlp.up_proj).
    ``bits`` None: not quantized."""

    method: str
    bits: int | None
    group_size: int
    lora_r: int
    lora_alpha: float
    lora_targets: list[str]
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (A, B)
    blocks: list[dict] = field(default_factory=list)
    layers: dict[str, dict] = field(default_factory=dict)


def lora_config(r: int, alpha: float, targets: list[str], heads: list[str] | None = None, dropout: float = 0.0):
    """The peft LoraConfig of a quantized model (task heads, if any, train in full and are saved)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      modules_to_save=heads or None, exclude_modules=heads or None)


@torch.no_grad()
def attach_lora(model, r: int, alpha: float, targets: list[str], lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
                heads: list[str] | None = None):
    """Wrap ``model`` with peft LoRA and set each adapted module's A and B (missing ones keep B = 0)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(r, alpha, targets, heads))
    for name, module in peft_model.base_model.model.named_modules():
        if name in lora and hasattr(module, "lora_A"):
            A, B = lora[name]
            module.lora_A["default"].weight.copy_(A)
            module.lora_B["default"].weight.copy_(B)
    return peft_model
