"""LoftQ: normal-float codes and a LoRA that holds the best rank-r approximation of the quantization residual
(alternating ``quant.loftq_iters`` times, peftkit/quant/loftq.py)."""

from __future__ import annotations

from peftkit.quant.quantizers import Quantizer
from peftkit.utils.registry import QUANTIZERS


@QUANTIZERS.register("loftq", help="normal-float codes, LoRA = rank-r SVD of the residual (LoftQ)")
class LoftQ(Quantizer):
    name = "loftq"
    codes = "nf"
    symmetric_refusal = "uses normal-float levels (absmax, always symmetric)"

    def quantize_block(self, work):
        import torch

        from peftkit.quant.loftq import loftq_init

        stored = {}
        for name, q in work.qlinears.items():
            quantized, A, B = loftq_init(q.weight, q.bits, q.group_size, max(q.r, 1), q.scaling,
                                         work.options.loftq_iters)
            if q.r:
                with torch.no_grad():
                    q.lora_A.copy_(A)
                    q.lora_B.copy_(B)
            stored[name] = q.freeze(quantized)
        return stored, []
