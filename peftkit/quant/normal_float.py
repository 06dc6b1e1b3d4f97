"""Normal-float (NF2/NF3/NF4) group quantization, the data type of QLoRA and LoftQ.

The 2^b levels are quantiles of a standard normal, normalised to [-1, 1], with an exact zero and
one more positive than negative level (QLoRA's asymmetric construction; at 4 bits this gives
bitsandbytes' NF4 table exactly, see tests/quant/test_normal_float.py). A group of ``group_size``
consecutive weights of one row is scaled by its absmax and each weight takes the nearest level.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from peftkit.quant.uniform import grouped

NF_OFFSET = 0.9677083  # QLoRA: the outermost quantile, chosen so the extreme levels are not +-inf


@lru_cache(maxsize=None)
def _levels(bits: int) -> tuple[float, ...]:
    from scipy.stats import norm

    count = 2 ** bits
    positive = norm.ppf(torch.linspace(NF_OFFSET, 0.5, count // 2 + 1)[:-1].double().numpy())
    negative = -norm.ppf(torch.linspace(NF_OFFSET, 0.5, count // 2)[:-1].double().numpy())
    values = sorted([*positive.tolist(), 0.0, *negative.tolist()])
    top = max(values)
    return tuple(v / top for v in values)


def nf_levels(bits: int, device=None) -> torch.Tensor:
    """The 2^bits sorted NF levels in [-1, 1] (float32)."""
    if bits not in (2, 3, 4):
        raise ValueError(f"normal-float quantization supports 2, 3 or 4 bits, got {bits}")
    return torch.tensor(_levels(bits), dtype=torch.float32, device=device)


def nf_quantize(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 (out, in), absmax (out, in / g)): nearest NF level of each absmax-scaled weight."""
    with torch.no_grad():
        groups = grouped(weight.float(), group_size)
        absmax = groups.abs().amax(dim=-1).clamp(min=1e-12)
        normalised = groups / absmax[..., None]
        levels = nf_levels(bits, weight.device)
        # Nearest level = count of midpoints below the value (levels are sorted).
        midpoints = (levels[1:] + levels[:-1]) / 2
        codes = torch.bucketize(normalised, midpoints)
    return codes.reshape(weight.shape).to(torch.uint8), absmax


def nf_dequantize(codes: torch.Tensor, absmax: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    levels = nf_levels(bits, codes.device)
    values = levels[codes.long()]
    return (grouped(values, group_size) * absmax[..., None]).reshape(codes.shape)


def nf_fake_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    codes, absmax = nf_quantize(weight, bits, group_size)
    return nf_dequantize(codes, absmax, bits, group_size)


def bnb_nf4_fake_quantize(weight: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """bitsandbytes' own NF4 round trip (its CPU backend supports it), or None where unavailable."""
    try:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=group_size, quant_type="nf4")
        return bnbf.dequantize_4bit(packed, state).reshape(weight.shape).to(weight.dtype)
    except Exception:  # no backend for this device / build: the caller uses our NF4
        return None
