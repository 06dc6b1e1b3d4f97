"""ApiQ-bw: every projection of a block calibrated at once (clipping logits and LoRA) so that the quantized block
on the quantized chain reproduces the full-precision block on the full-precision chain (peftkit/quant/apiq.py)."""

from __future__ import annotations

from peftkit.quant.quantizers import Quantizer
from peftkit.utils.registry import QUANTIZERS


@QUANTIZERS.register("apiq-bw", help="ApiQ block-wise: a block's clipping and LoRA calibrated on its outputs")
class ApiQBlockWise(Quantizer):
    name = "apiq-bw"
    calibrated = True
    learned_clipping = True

    def quantize_block(self, work):
        from peftkit.quant.apiq import calibrate_block
        from peftkit.quant.blocks import run_block_batched

        qblock, qlinears, settings = work.qblock, work.qlinears, work.settings
        # the aug target F(Xq; W) is the same block with every QuantLinear in FP mode
        y_aug = None
        if settings.aug_loss:
            for q in qlinears.values():
                q.fp_mode = True
            y_aug = run_block_batched(qblock, work.x_q, work.kwargs, settings.batch_size)
            for q in qlinears.values():
                q.fp_mode = False
        report = calibrate_block(qblock, qlinears, work.x_q, work.y_fp, y_aug, work.kwargs, settings,
                                 f"block {work.index}")
        return {name: q.freeze() for name, q in qlinears.items()}, [report]
