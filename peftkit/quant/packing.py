"""Store b-bit codes in real low-bit storage: 8 codes of b bits fill exactly b bytes.

Codes are laid out row-major; the tail is padded with zeros to a multiple of 8 codes. Works for
any b in 1..8 (2, 3 and 4 are the ones used); ``unpack_codes`` inverts ``pack_codes`` exactly.
"""

from __future__ import annotations

import threading

import torch


def packed_size(count: int, bits: int) -> int:
    return (count + 7) // 8 * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits) of any shape -> flat uint8 tensor of packed_size(numel, bits) bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can pack 1 to 8 bits per code, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] to be packed into {bits} bits")
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
    shifts = torch.arange(8, device=flat.device) * bits
    words = (flat << shifts).sum(dim=1)  # 8 * bits <= 64 bits per word
    byte_shifts = torch.arange(bits, device=flat.device) * 8
    return ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of pack_codes: uint8 codes of ``shape``."""
    count = 1
    for s in shape:
        count *= int(s)
    if packed.numel() != packed_size(count, bits):
        raise ValueError(f"{packed.numel()} packed bytes do not hold {count} codes of {bits} bits")
    chunks = packed.reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    words = (chunks << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=packed.device) * bits
    codes = (words[:, None] >> shifts) & (2 ** bits - 1)
    return codes.reshape(-1)[:count].reshape(tuple(shape)).to(torch.uint8)


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, kept for the next unpack of the same kind. The temporaries of an
    unpack (byte planes, codes, the exact float32 weight) are as large as the weight; allocated afresh for every
    matmul they cost page faults each time where big blocks are mmapped, and they leave holes in the heap where they
    are not. One buffer each, the size of the largest layer, is reused instead; nothing that an unpack returns
    points into it. Keyed by thread too, so that two threads unpacking at once never share one."""
    key = (name, dtype, torch.device(device), threading.get_ident())
    buffer = _SCRATCH.get(key)
    # a buffer made under torch.inference_mode (an eval) cannot be written outside it (the next training step)
    stale = buffer is not None and buffer.is_inference() and not torch.is_inference_mode_enabled()
    if buffer is None or stale or buffer.numel() < numel:
        buffer = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def fast_gptq_layout(g_idx: torch.Tensor, bits: int, group_size: int, in_features: int, out_features: int) -> bool:
    """Whether ``unpack_gptq_t`` reads these GPTQ tensors: whole bytes of codes (2, 4 or 8 bits), no reordering
    (g_idx = i // group_size) and groups of whole 32-bit words."""
    if bits not in (2, 4, 8) or group_size % (32 // bits) or in_features % group_size or g_idx.numel() != in_features:
        return False
    return bool(torch.equal(g_idx.long(), torch.arange(in_features, device=g_idx.device) // group_size))


def unpack_gptq_t(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """W^T (in, out) of GPTQ tensors without reordering: ``dequantize_gptq(...).T`` in one rounding.

    qweight (in * b / 32, out) packs each output column along the input dimension, so it unpacks into W^T with no
    transpose of anything weight-sized: byte k of word r holds input rows r * 32/b + k * 8/b + j at bits [b*j, b*j+b).
    scale * (q - z) is formed exactly in float32 (q * scale and z * scale are exact products of an 11-bit scale and
    an integer below 2^8, and so is their difference), then rounded once to ``dtype``: for float16 that is the
    float16 product GPTQ kernels compute, and float32 goes through float16 to equal it bit for bit. bfloat16 rounds
    the exact value once, where ``dequantize_gptq`` rounds it to float16 first; the two differ by one bfloat16 unit
    in the last place at most, in the rare weights where the float16 rounding lands on a bfloat16 tie. Each step is
    one whole-tensor op on bytes or floats (per-code shifts of int32 words and gathering scales by g_idx, as
    ``dequantize_gptq`` does, cost several times more).
    """
    words, out_features = qweight.shape
    per_byte, mask = 8 // bits, (1 << bits) - 1
    in_features = words * 32 // bits
    groups = in_features // group_size
    planes = _scratch("planes", words * 4 * out_features, torch.uint8, qweight.device).view(words, 4, out_features)
    planes.copy_(qweight.view(torch.uint8).view(words, out_features, 4).permute(0, 2, 1))
    codes = _scratch("codes", in_features * out_features, torch.uint8, qweight.device)
    codes = codes.view(words, 4, per_byte, out_features)
    shifted = _scratch("shifted", planes.numel(), torch.uint8, qweight.device).view_as(planes)
    for j in range(per_byte):
        torch.bitwise_right_shift(planes, bits * j, out=shifted)
        torch.bitwise_and(shifted, mask, out=codes[:, :, j])
    zero_planes = qzeros.view(torch.uint8)  # (groups, out * b / 8): zero points packed along the output dimension
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=qzeros.device)
    zeros = ((zero_planes.unsqueeze(-1) >> shifts) & mask).reshape(qzeros.shape[0], -1)[:groups, :out_features]
    scale = scales[:groups].unsqueeze(1).float()
    exact = _scratch("exact", in_features * out_features, torch.float32, qweight.device)
    exact = exact.view(groups, group_size, out_features)
    exact.copy_(codes.view(groups, group_size, out_features))
    weight = exact.mul_(scale).sub_(zeros.unsqueeze(1) * scale).view(in_features, out_features)
    if dtype in (torch.float16, torch.bfloat16):
        return weight.to(dtype)
    return weight.to(torch.float16).to(dtype)
