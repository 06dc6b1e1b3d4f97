"""QuantLinear: a Linear whose weight is fake-quantized, plus a LoRA update — what calibration trains.

  y = x W_hat^T + b + s * (x A^T) B^T,   W_hat = fake_quantize(W; gamma, beta),  s = alpha / r

The FP weight W stays frozen; ``bits`` None keeps W_hat = W (not quantized). Learnable: the clipping logits gamma, beta (one pair per group, when
``lwc``) and the LoRA factors A (r x in, kaiming-uniform like peft) and B (out x r, zero). The LoRA
term is computed in the same order as peft's LoRA Linear so a saved adapter reproduces it.

``fp_mode`` makes the module behave like the original Linear (targets and the aug term of ApiQ-bw).
``freeze()`` fixes W_hat to the exact dequantized weight of the stored codes (no STE round-off),
so the outputs after calibration are the outputs of the saved checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.quant.quantized_weight import QuantizedWeight
from peftkit.quant.uniform import (
    LWC_INIT,
    fake_quantize,
    grouped,
    quantize_codes,
    scale_and_zero,
)


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, bits: int | None, group_size: int, symmetric: bool = False,
                 lwc: bool = True, r: int = 0, scaling: float = 1.0):
        super().__init__()
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.out_features, self.in_features = self.weight.shape
        n_groups = self.in_features // group_size
        self._group_range = None
        if bits is not None:
            with torch.no_grad():  # W is frozen: its group max/min never change
                groups = grouped(self.weight, group_size)
                self._group_range = (groups.amax(dim=-1), groups.amin(dim=-1))
        self.lwc = lwc and bits is not None
        if self.lwc:
            kw = dict(device=self.weight.device, dtype=self.weight.dtype)
            self.gamma = nn.Parameter(torch.full((self.out_features, n_groups), LWC_INIT, **kw))
            self.beta = nn.Parameter(torch.full((self.out_features, n_groups), LWC_INIT, **kw))
        else:
            self.gamma = self.beta = None
        self.r, self.scaling = r, scaling
        if r:
            self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=self.weight.device, dtype=self.weight.dtype))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=self.weight.device, dtype=self.weight.dtype))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default LoRA init
        else:
            self.lora_A = self.lora_B = None
        self.fp_mode = False
        self.fixed_weight: torch.Tensor | None = None  # set by freeze() or by a baseline quantizer

    def clip_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.gamma, self.beta) if p is not None]

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.lora_A, self.lora_B) if p is not None]

    def quantized_weight(self) -> torch.Tensor:
        if self.fixed_weight is not None:
            return self.fixed_weight
        return fake_quantize(self.weight, self.bits, self.group_size, self.symmetric, self.gamma, self.beta,
                             group_range=self._group_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp_mode:
            return F.linear(x, self.weight, self.bias)
        out = F.linear(x, self.quantized_weight(), self.bias)
        if self.r:
            out = out + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        return out

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        """Codes, scales and zeros of the current clipping (exact rounding, no STE)."""
        if self.bits is None:
            return QuantizedWeight("none", None, self.group_size, tuple(self.weight.shape), weight=self.weight.detach().clone())
        scale, zero = scale_and_zero(self.weight, self.bits, self.group_size, self.symmetric, self.gamma, self.beta,
                                     ste=False, group_range=self._group_range)
        codes = quantize_codes(self.weight, scale, zero, self.bits, self.group_size)
        return QuantizedWeight("uniform", self.bits, self.group_size, tuple(self.weight.shape),
                               codes=codes.reshape(self.weight.shape).to(torch.uint8), scales=scale, zeros=zero)

    @torch.no_grad()
    def freeze(self, quantized: QuantizedWeight | None = None) -> QuantizedWeight:
        """Fix the weight to the dequantized stored codes and stop training; return what is stored."""
        quantized = quantized or self.export()
        self.fixed_weight = quantized.dequantize().to(self.weight.dtype)
        for p in self.parameters():
            p.requires_grad_(False)
        return quantized

    @torch.no_grad()
    def set_rtn_state(self) -> None:
        """Fall-back state: no clipping (plain min/max RTN) and a zero LoRA update."""
        self.fixed_weight = None
        if self.lwc:
            self.gamma.fill_(torch.inf)  # sigmoid(inf) = 1: the full min/max range
            self.beta.fill_(torch.inf)
        if self.r:
            self.lora_B.zero_()
