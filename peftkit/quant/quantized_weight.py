"""One quantized weight matrix as a real low-bit checkpoint stores it.

kind "uniform": W = (codes - zeros) * scales       (per group of ``group_size`` input columns)
kind "nf":      W = NF_LEVELS[codes] * scales      (scales = the group absmax; no zeros)
kind "none":    16 bits, the weight is kept as it is (``weight``)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftkit.quant.normal_float import nf_dequantize
from peftkit.quant.packing import pack_codes, unpack_codes
from peftkit.quant.uniform import dequantize_codes, grouped


@dataclass
class QuantizedWeight:
    kind: str  # "uniform" | "nf" | "none"
    bits: int
    group_size: int
    shape: tuple[int, int]
    codes: torch.Tensor | None = None  # uint8 (out, in), unpacked
    scales: torch.Tensor | None = None  # (out, in / g)
    zeros: torch.Tensor | None = None  # (out, in / g), integers (uniform only)
    weight: torch.Tensor | None = None  # kind "none" only

    def dequantize(self) -> torch.Tensor:
        if self.kind == "none":
            return self.weight
        if self.kind == "uniform":
            codes = grouped(self.codes.to(self.scales.dtype), self.group_size)
            return dequantize_codes(codes, self.scales, self.zeros)
        if self.kind == "nf":
            return nf_dequantize(self.codes, self.scales, self.bits, self.group_size)
        raise ValueError(f"unknown quantized weight kind {self.kind!r}")

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors for a safetensors file: packed codes, scales and (uniform) zeros."""
        if self.kind == "none":
            return {f"{prefix}.weight": self.weight.detach().cpu().contiguous()}
        out = {f"{prefix}.qcodes": pack_codes(self.codes.cpu(), self.bits),
               f"{prefix}.scales": self.scales.detach().float().cpu().contiguous()}
        if self.zeros is not None:
            # Zero points are integers; int16 holds them (asymmetric ones are clamped to +-1e4).
            out[f"{prefix}.zeros"] = self.zeros.detach().round().to(torch.int16).cpu().contiguous()
        return out

    def describe(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "group_size": self.group_size, "shape": list(self.shape)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, info: dict) -> "QuantizedWeight":
        shape = tuple(info["shape"])
        kind, bits, group = info["kind"], int(info["bits"]), int(info["group_size"])
        if kind == "none":
            return cls(kind, bits, group, shape, weight=tensors[f"{prefix}.weight"])
        zeros = tensors.get(f"{prefix}.zeros")
        return cls(kind, bits, group, shape,
                   codes=unpack_codes(tensors[f"{prefix}.qcodes"], bits, shape),
                   scales=tensors[f"{prefix}.scales"],
                   zeros=None if zeros is None else zeros.to(torch.float32))
