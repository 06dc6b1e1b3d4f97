"""The GPTQ checkpoint layout of one quantized Linear (asymmetric or symmetric, no activation reordering,
``checkpoint_format: gptq_v2``), written and read without any GPTQ library.

For a Linear with weight (out, in), groups of g consecutive input columns, b-bit codes q (out, in) and per-group
scales s and zero points z (out, in / g):

  qweight  int32   (in * b / 32, out)     the codes of each output column, packed along the input dimension
  qzeros   int32   (in / g, out * b / 32) the zero points of each group row, packed along the output dimension
  scales   float16 (in / g, out)
  g_idx    int32   (in,)                  group of each input column: i // g (no reordering)
  W[o, i] = scales[g_idx[i], o] * (q[o, i] - z[g_idx[i], o])   (a float16 product, as GPTQ kernels compute it)

Packing: the values along the packed dimension form one little-endian bit stream, value j at bits [b*j, b*j + b),
cut into 32-bit words. At 2 and 4 bits a word holds 32 / b whole values; at 3 bits values straddle words (GPTQ's
3-bit layout: 32 values in 3 words). This is exactly what ``packing.pack_codes`` writes as bytes, so packing is a
reinterpretation of those bytes as int32.

gptq_v2 stores the zero point itself. The older gptq (v1) layout stored z - 1, so a group whose zero point is 0 —
common at 2 bits — cannot be represented there; readers that assume v1 decode such groups wrongly. We only write v2
and say so in the config, where GPTQModel and transformers read it.
"""

from __future__ import annotations

import sys

import torch

from peftkit.quant.packing import pack_codes

CHECKPOINT_FORMAT = "gptq_v2"
GPTQ_BITS = (2, 3, 4, 8)


def check_packable(out_features: int, in_features: int, bits: int, group_size: int) -> str | None:
    """Why a (out, in) weight cannot be stored in the GPTQ layout, or None when it can."""
    if bits not in GPTQ_BITS:
        return f"GPTQ stores 2, 3, 4 or 8 bits, not {bits}"
    if in_features % group_size:
        return f"in_features {in_features} is not a multiple of the group size {group_size}"
    if (in_features * bits) % 32 or (out_features * bits) % 32:
        return (f"a {out_features}x{in_features} weight does not fill whole 32-bit words at {bits} bits "
                f"(both dimensions must be multiples of {32 // _gcd(32, bits)})")
    return None


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _require_little_endian() -> None:
    if sys.byteorder != "little":  # the int32 view of packed bytes assumes it (as GPTQ's own packers do)
        raise RuntimeError("the GPTQ packer needs a little-endian machine")


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) integers in [0, 2^b) -> (rows, n * b / 32) int32: each row one little-endian bit stream."""
    _require_little_endian()
    rows, n = values.shape
    if (n * bits) % 32:
        raise ValueError(f"{n} values of {bits} bits do not fill whole 32-bit words")
    packed = pack_codes(values, bits)  # row boundaries fall on byte boundaries because n * b is a multiple of 32
    return packed.reshape(rows, n * bits // 8).view(torch.int32)


def _word_shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(0, 32, bits, device=device, dtype=torch.int32)


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: (rows, w) int32 -> (rows, w * 32 / b) int32 values."""
    rows, count = words.shape
    mask = 2 ** bits - 1
    if 32 % bits == 0:
        per_word = 32 // bits
        values = (words.unsqueeze(-1) >> _word_shifts(bits, words.device)) & mask
        return values.reshape(rows, count * per_word)
    if bits != 3:
        raise ValueError(f"cannot unpack {bits}-bit values")
    # 3 bits: 32 values in 3 words; values 0..20 lie in the low 64 bits, 21..31 in the high 64 bits.
    triples = words.reshape(rows, count // 3, 3).to(torch.int64) & 0xFFFFFFFF
    low = triples[..., 0] | (triples[..., 1] << 32)
    high = triples[..., 1] | (triples[..., 2] << 32)
    j = torch.arange(32, device=words.device)
    low_part = (low.unsqueeze(-1) >> (3 * j[:21])) & mask
    high_part = (high.unsqueeze(-1) >> (3 * j[21:] - 32)) & mask
    return torch.cat([low_part, high_part], dim=-1).reshape(rows, count // 3 * 32).to(torch.int32)


def unpack_columns(words: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight layout: (in * b / 32, out) int32 -> (in, out) codes, packed along the first dimension."""
    return unpack_rows(words.T.contiguous(), bits).T


def to_gptq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
            group_size: int) -> dict[str, torch.Tensor]:
    """codes (out, in), scales and zeros (out, in / g) -> the GPTQ tensors of one Linear (without bias).

    Zero points must be integers in [0, 2^b - 1]; scales are stored as float16 (calibration rounds them to
    float16 already, so nothing changes here).
    """
    out_features, in_features = codes.shape
    reason = check_packable(out_features, in_features, bits, group_size)
    if reason:
        raise ValueError(reason)
    zeros = zeros.detach().round()
    if zeros.numel() and (zeros.min() < 0 or zeros.max() > 2 ** bits - 1):
        raise ValueError(f"zero points must lie in [0, {2 ** bits - 1}] for {bits}-bit GPTQ, "
                         f"found [{zeros.min().item():g}, {zeros.max().item():g}]")
    codes = codes.to(torch.int64)
    return {
        "qweight": pack_rows(codes, bits).T.contiguous(),
        "qzeros": pack_rows(zeros.to(torch.int64).T.contiguous(), bits).contiguous(),
        "scales": scales.detach().to(torch.float16).T.contiguous(),
        "g_idx": (torch.arange(in_features, dtype=torch.int32) // group_size),
    }


def from_gptq(tensors: dict[str, torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ tensors of one Linear -> codes (out, in), scales (out, in / g) float16, zeros (out, in / g)."""
    codes = unpack_columns(tensors["qweight"], bits).T.contiguous()
    zeros = unpack_rows(tensors["qzeros"], bits)[:, : tensors["scales"].shape[1]].T.contiguous()
    return codes, tensors["scales"].T.contiguous(), zeros


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W (out, in) of the GPTQ tensors as GPTQ kernels compute it: scale * (q - z) in the scales' dtype (float16),
    then cast to ``dtype``. Doing the same here makes peftkit's model equal to transformers' bit for bit."""
    codes = unpack_columns(qweight, bits)  # (in, out)
    zeros = unpack_rows(qzeros, bits)[:, : scales.shape[1]]  # (in / g, out)
    index = g_idx.long()
    weight = scales[index] * (codes - zeros[index]).to(scales.dtype)
    return weight.T.to(dtype)


def quantization_config(bits: int, group_size: int, symmetric: bool, quantizer: str) -> dict:
    """config.json's quantization_config for these tensors (read by transformers' GPTQ integration)."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": bool(symmetric),
        "checkpoint_format": CHECKPOINT_FORMAT,
        "true_sequential": True,
        "meta": {"quantizer": [quantizer]},
    }
