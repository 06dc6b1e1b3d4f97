"""One quantized weight matrix as a real low-bit checkpoint stores it.

kind "uniform": W = (codes - zeros) * scales       (per group of ``group_size`` input columns)
kind "nf":      W = NF_LEVELS[codes] * scales      (scales = the group absmax; no zeros)
kind "none":    not quantized (bits None; quantization.json files written before bits could be null say 16), the
                weight is kept as it is (``weight``)
"""

from __future__ import annotations

import torch

from peftkit.quant.normal_float import nf_dequantize
from peftkit.quant.packing import pack_codes, unpack_codes
from peftkit.quant.uniform import dequantize_codes, grouped


class QuantizedWeight:
    """Codes are held packed, b bits each (``packing.pack_codes``): a quantizer keeps every finished matrix until the
    model is written, and at 1 byte per code that result grew with depth as fast as the model; packed it is
    b/8 of that. ``codes`` unpacks them (uint8, (out, in)) on each access."""

    def __init__(self, kind: str, bits: int | None, group_size: int, shape: tuple[int, int], codes: torch.Tensor | None = None,
                 scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None, weight: torch.Tensor | None = None):
        self.kind, self.bits, self.group_size, self.shape = kind, bits, group_size, tuple(shape)
        self.packed_codes = None if codes is None else pack_codes(codes.detach().cpu(), bits)
        self.scales = scales  # (out, in / g)
        self.zeros = zeros  # (out, in / g), integers (uniform only)
        self.weight = weight  # kind "none" only

    @property
    def codes(self) -> torch.Tensor | None:
        if self.packed_codes is None:
            return None
        device = self.scales.device if self.scales is not None else "cpu"
        return unpack_codes(self.packed_codes, self.bits, self.shape).to(device)

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.kind}, {self.bits} bits, group {self.group_size}, shape {self.shape})"

    def dequantize(self) -> torch.Tensor:
        if self.kind == "none":
            return self.weight
        if self.kind == "uniform":
            codes = grouped(self.codes.to(self.scales.dtype), self.group_size)
            return dequantize_codes(codes, self.scales, self.zeros)
        if self.kind == "nf":
            return nf_dequantize(self.codes, self.scales, self.bits, self.group_size)
        raise ValueError(f"unknown quantized weight kind {self.kind!r}")

    def describe(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "group_size": self.group_size, "shape": list(self.shape)}
