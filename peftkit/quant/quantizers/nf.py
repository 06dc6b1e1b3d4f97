"""NF: normal-float codes (NF2/NF3/NF4, QLoRA's data type) with one absmax per group, LoRA B = 0 (the QLoRA start)."""

from __future__ import annotations

from peftkit.quant.quantizers import Quantizer
from peftkit.utils.registry import QUANTIZERS


@QUANTIZERS.register("nf", help="normal-float codes (the QLoRA start), LoRA B = 0")
class NormalFloat(Quantizer):
    name = "nf"
    codes = "nf"
    symmetric_refusal = "uses normal-float levels (absmax, always symmetric)"

    def quantize_block(self, work):
        from peftkit.quant.normal_float import nf_quantize
        from peftkit.quant.quantized_weight import QuantizedWeight

        stored = {}
        for name, q in work.qlinears.items():
            codes, absmax = nf_quantize(q.weight, q.bits, q.group_size)
            stored[name] = q.freeze(QuantizedWeight("nf", q.bits, q.group_size, tuple(q.weight.shape), codes=codes,
                                                    scales=absmax))
        return stored, []
