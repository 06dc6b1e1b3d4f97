"""RTN: plain min/max round-to-nearest, LoRA B = 0 (the baseline every other quantizer is compared with)."""

from __future__ import annotations

from peftkit.quant.quantizers import Quantizer
from peftkit.utils.registry import QUANTIZERS


@QUANTIZERS.register("rtn", help="min/max round-to-nearest, LoRA B = 0")
class RoundToNearest(Quantizer):
    name = "rtn"

    def quantize_block(self, work):
        # no clipping logits (learned_clipping is off): export() is plain min/max RTN
        return {name: q.freeze() for name, q in work.qlinears.items()}, []
