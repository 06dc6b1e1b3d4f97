"""PackedLinear: a Linear whose weight stays packed in memory (GPTQ tensors, or normal-float codes).

Each forward unpacks the weight, multiplies and drops it; the backward unpacks it again for the input gradient
instead of keeping it. So a training step holds the packed weights, the activations and one layer's unpacked
weight at a time — never the full-precision model. The weight itself gets no gradient (the base is frozen; LoRA on
top is what trains).

Two storage kinds:
  gptq  qweight / qzeros / scales / g_idx as in gptq_format.py (what transformers' GPTQ integration reads)
  nf    normal-float codes packed b bits each (qweight, uint8) and one absmax per group (absmax); NF2/NF3 have no
        format outside peftkit, so these layers load only here

peft puts LoRA on it through ``register_lora`` (peft's GPTQ LoRA layer: base output + LoRA, never merged), the
same layer peft uses when it loads the adapter on a GPTQ model elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.quant.gptq_format import dequantize_gptq, to_gptq
from peftkit.quant.normal_float import nf_dequantize
from peftkit.quant.packing import pack_codes, unpack_codes


class _UnpackedMatmul(torch.autograd.Function):
    """y = x W^T + b with W unpacked by ``unpack()`` in forward and again in backward (nothing weight-sized saved)."""

    @staticmethod
    def forward(ctx, x, bias, module):
        weight = module.unpack(x.dtype)
        ctx.module = module
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.module.unpack(grad_out.dtype)
        return grad_x, None, None


class PackedLinear(nn.Module):
    def __init__(self, kind: str, bits: int, group_size: int, in_features: int, out_features: int,
                 tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None):
        super().__init__()
        if kind not in ("gptq", "nf"):
            raise ValueError(f"unknown packed kind {kind!r}")
        self.kind, self.bits, self.group_size = kind, bits, group_size
        self.in_features, self.out_features = in_features, out_features
        # peft's layer-size lookup reads these names for quantized linears
        self.infeatures, self.outfeatures = in_features, out_features
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        if bias is not None:
            self.register_buffer("bias", bias)
        else:
            self.bias = None

    @classmethod
    def from_quantized(cls, quantized, bias: torch.Tensor | None = None) -> "PackedLinear":
        """From a QuantizedWeight of kind 'uniform' (stored as GPTQ) or 'nf'."""
        out_features, in_features = quantized.shape
        if quantized.kind == "uniform":
            tensors = to_gptq(quantized.codes, quantized.scales, quantized.zeros, quantized.bits, quantized.group_size)
            kind = "gptq"
        elif quantized.kind == "nf":
            tensors = {"qweight": pack_codes(quantized.codes, quantized.bits),
                       "absmax": quantized.scales.detach().float().contiguous()}
            kind = "nf"
        else:
            raise ValueError(f"a {quantized.kind!r} weight is not packed")
        return cls(kind, quantized.bits, quantized.group_size, in_features, out_features, tensors, bias)

    def unpack(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full weight (out, in) in ``dtype`` (GPTQ: the float16 product GPTQ kernels compute, then cast)."""
        if self.kind == "gptq":
            return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype)
        shape = (self.out_features, self.in_features)
        codes = unpack_codes(self.qweight, self.bits, shape)
        return nf_dequantize(codes, self.absmax, self.bits, self.group_size).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _UnpackedMatmul.apply(x, bias, self)

    def packed_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"bits={self.bits}, group_size={self.group_size}")


def register_lora(lora_config) -> None:
    """Let peft put LoRA on PackedLinear (peft's GPTQ LoRA layer: base output plus LoRA, unmerged)."""
    from peft.tuners.lora.gptq import GPTQLoraLinear

    lora_config._register_custom_module({PackedLinear: GPTQLoraLinear})
