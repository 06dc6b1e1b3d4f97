"""Normal-float (NF2/NF3/NF4) group quantization, the data type of QLoRA and LoftQ.

The 2^b levels are quantiles of a standard normal, normalised to [-1, 1], with an exact zero and
one more positive than negative level (QLoRA's asymmetric construction). At 4 bits the levels are QLoRA's
published NF4 table as float32 (``NF4_LEVELS``), the one bitsandbytes decodes with: the construction below
lands within one float32 step of it, but bitsandbytes dequantizes with its own fixed table (not the ``quant_map``
a checkpoint stores), so only these exact values make a bitsandbytes 4-bit checkpoint decode to our weights bit
for bit (see bnb_format.py and tests/quant/test_normal_float.py). A group of ``group_size`` consecutive
weights of one row is scaled by its absmax and each weight takes the nearest level.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from peftkit.quant.uniform import grouped

NF_OFFSET = 0.9677083  # QLoRA: the outermost quantile, chosen so the extreme levels are not +-inf

# QLoRA's NF4 data type (Dettmers et al., 2023, appendix E), the values bitsandbytes hard-codes for quant_type nf4.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@lru_cache(maxsize=None)
def constructed_levels(bits: int) -> tuple[float, ...]:
    """The levels from normal quantiles (float64); NF4 uses the published table instead (``NF4_LEVELS``)."""
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
    levels = NF4_LEVELS if bits == 4 else constructed_levels(bits)
    return torch.tensor(levels, dtype=torch.float32, device=device)


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
