"""Store b-bit codes in real low-bit storage: 8 codes of b bits fill exactly b bytes.

Codes are laid out row-major; the tail is padded with zeros to a multiple of 8 codes. Works for
any b in 1..8 (2, 3 and 4 are the ones used); ``unpack_codes`` inverts ``pack_codes`` exactly.
"""

from __future__ import annotations

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
