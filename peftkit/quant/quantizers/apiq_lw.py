"""ApiQ-lw: the projections of a block calibrated one at a time in the order the block calls them, each on its input
in the quantized block against W times its input in the full-precision block (peftkit/quant/apiq.py)."""

from __future__ import annotations

from peftkit.quant.quantizers import Quantizer
from peftkit.utils.registry import QUANTIZERS


@QUANTIZERS.register("apiq-lw", help="ApiQ layer-wise: each projection's clipping and LoRA calibrated on its output")
class ApiQLayerWise(Quantizer):
    name = "apiq-lw"
    calibrated = True
    learned_clipping = True

    def quantize_block(self, work):
        from peftkit.quant.apiq import calibrate_linear
        from peftkit.quant.blocks import capture_linear_inputs, forward_order

        block, qblock, qlinears, kwargs, settings = work.block, work.qblock, work.qlinears, work.kwargs, work.settings
        x_fp, x_q = work.x_fp, work.x_q
        fp_inputs = capture_linear_inputs(block, {n: block.get_submodule(n) for n in qlinears}, x_fp, kwargs,
                                          settings.batch_size)
        stored, reports = {}, []
        for name in forward_order(qblock, qlinears, x_q, kwargs):
            reports.append(calibrate_linear(qblock, qlinears[name], fp_inputs.pop(name), x_q, kwargs, settings,
                                            f"block {work.index} {name}"))
            stored[name] = qlinears[name].freeze()
        return stored, reports
