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
from peftkit.quant.packing import fast_gptq_layout, pack_codes, unpack_codes, unpack_gptq_t


def _rerun_for_backward() -> bool:
    """Whether this forward's saved tensors are dropped and rebuilt for the backward, or this forward is that
    rebuild: gradient checkpointing (torch.utils.checkpoint: its pack hook discards what the first forward saves,
    its recompute hook keeps what the rerun saves until the backward uses it; the reentrant form reruns the forward
    inside the backward). There, saving the unpacked weight costs nothing for long and spares the backward its own
    unpack: two unpacks per layer and step with checkpointing, as without it."""
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if hooks is not None and getattr(hooks[0], "__qualname__", "").startswith(
                ("_checkpoint_hook.", "_recomputation_hook.")):
            return True
        return torch._C._current_graph_task_id() != -1
    except (AttributeError, RuntimeError):  # private hooks moved: unpack again in the backward, slower but right
        return False


class _UnpackedMatmul(torch.autograd.Function):
    """y = x W^T + b with W^T unpacked by ``unpack_t()``: in the forward, and again in the backward, so that nothing
    weight-sized is saved (the input x is not saved either: the frozen weight gets no gradient). Under gradient
    checkpointing the unpacked weight is saved instead (see _rerun_for_backward)."""

    @staticmethod
    def forward(ctx, x, bias, module):
        weight_t = module.unpack_t(x.dtype)
        ctx.module = module
        ctx.kept = x.requires_grad and _rerun_for_backward()
        if ctx.kept:
            ctx.save_for_backward(weight_t)
        return nn.functional.linear(x, weight_t.T, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight_t = ctx.saved_tensors[0] if ctx.kept else ctx.module.unpack_t(grad_out.dtype)
            grad_x = grad_out @ weight_t.T
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
        self._fast_gptq = kind == "gptq" and fast_gptq_layout(self.g_idx, bits, group_size, in_features, out_features)

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

    def unpack_t(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The transposed weight (in, out) in ``dtype``, equal to ``unpack(dtype).T``. GPTQ at 2, 4 or 8 bits without
        reordering unpacks straight into this layout (GPTQ packs along the input dimension) in a few whole-tensor
        ops; other layouts transpose ``unpack``."""
        if self._fast_gptq:
            return unpack_gptq_t(self.qweight, self.qzeros, self.scales, self.bits, self.group_size, dtype)
        return self.unpack(dtype).T

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
