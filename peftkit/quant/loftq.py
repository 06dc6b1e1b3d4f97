"""LoftQ initialisation (Li et al., 2023), with our own NF2/NF3/NF4 quantizer.

Alternate T times:
  Q_t = quant(W - s * B_{t-1} A_{t-1})                   (B_0 A_0 = 0)
  U S V^T = rank-r SVD of (W - Q_t);  B_t = U sqrt(S) / s,  A_t = sqrt(S) V^T
so that s * B_t A_t is the best rank-r approximation of the quantization residual.
peft's own LoftQ only offers 4/8 bits and hard-codes CUDA, hence this module.
"""

from __future__ import annotations

import torch

from peftkit.quant.normal_float import nf_dequantize, nf_quantize
from peftkit.quant.quantized_weight import QuantizedWeight


@torch.no_grad()
def loftq_init(weight: torch.Tensor, bits: int, group_size: int, r: int, scaling: float,
               iters: int = 1) -> tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    """(quantized weight, A (r x in), B (out x r)) such that Q + scaling * B A approximates W."""
    weight = weight.detach().float()
    lora_product = torch.zeros_like(weight)  # s * B A
    A = weight.new_zeros(r, weight.shape[1])
    B = weight.new_zeros(weight.shape[0], r)
    quantized = None
    for _ in range(max(1, iters)):
        codes, absmax = nf_quantize(weight - lora_product, bits, group_size)
        quantized = QuantizedWeight("nf", bits, group_size, tuple(weight.shape), codes=codes, scales=absmax)
        residual = weight - nf_dequantize(codes, absmax, bits, group_size)
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
        root = S[:r].sqrt()
        B = U[:, :r] * root / scaling
        A = root[:, None] * Vh[:r]
        lora_product = scaling * (B @ A)
    return quantized, A, B
