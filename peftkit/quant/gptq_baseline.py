"""The GPTQ baseline of the quant bench: the ``gptq`` quantizer (peftkit/quant/quantizers/gptq.py: GPTQModel's own
GPTQ solver) on peftkit's calibration windows, with no LoRA (r = 0), as a QuantResult."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from peftkit.quant.quantizers.gptq import gptq_codes, subsets

__all__ = ["gptq_codes", "gptq_quantize", "subsets"]


def gptq_quantize(model, calib_ids: torch.Tensor, bits: int, group_size: int, batch_size: int = 4,
                  damp_percent: float | None = None, log=print):
    """QuantResult of GPTQ (r = 0) for every projection of every block of ``model`` (left unchanged)."""
    from peftkit.quant.pipeline import quantize_model

    options = SimpleNamespace(method="gptq", bits=bits, group_size=group_size, symmetric=False, lora_r=0,
                              lora_alpha=1.0, lora_targets=None, loftq_iters=1, epochs=1, lr_lora=0.0, lr_clip=0.0,
                              weight_decay=0.0, aug_loss=False, batch_size=batch_size, seed=0,
                              damp_percent=damp_percent)
    return quantize_model(model, options, calib_ids, log=log)
