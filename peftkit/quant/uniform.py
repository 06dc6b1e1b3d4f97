"""Uniform b-bit group-wise quantization with learnable weight clipping (LWC, as in OmniQuant/ApiQ).

A group is ``group_size`` consecutive input columns of one output row. Per group:

  xmax = sigmoid(gamma) * max(W_g),  xmin = sigmoid(beta) * min(W_g)     (gamma, beta learnable, init 4.0)
  asymmetric: scale = clamp((xmax - xmin) / (2^b - 1), 1e-5), zero = round(-xmin / scale)
  symmetric:  scale = clamp(2 * max(|xmax|, |xmin|) / (2^b - 1), 1e-5), zero = 2^(b-1)   (GPTQ's convention,
              so that packed-int kernels can assume a fixed zero point)
  codes = clamp(round(W / scale) + zero, 0, 2^b - 1),  W_hat = (codes - zero) * scale

Rounding uses a straight-through estimator while training, so gradients reach gamma and beta
through the scale. Without clipping logits (``gamma=None``) this is plain round-to-nearest (RTN).
"""

from __future__ import annotations

import torch

LWC_INIT = 4.0
MIN_SCALE = 1e-5


class _RoundSTE(torch.autograd.Function):
    """One kernel each way (cheaper than x + (round(x) - x).detach(), and exactly round(x) forward)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity in the backward pass (straight-through estimator)."""
    return _RoundSTE.apply(x)


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, in / g, g): the groups of each row."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not divisible by group_size {group_size}")
    return weight.reshape(out_features, in_features // group_size, group_size)


def scale_and_zero(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                   gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None,
                   ste: bool = True, group_range: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero point, each (out, in / g). Differentiable in gamma/beta (and W).

    ``group_range`` = precomputed (max, min) of each group of a frozen W (saves two reductions per step).
    """
    if group_range is None:
        groups = grouped(weight, group_size)
        group_range = (groups.amax(dim=-1), groups.amin(dim=-1))
    xmax, xmin = group_range
    if gamma is not None:
        xmax = torch.sigmoid(gamma) * xmax
    if beta is not None:
        xmin = torch.sigmoid(beta) * xmin
    qmax = 2 ** bits - 1
    if symmetric:
        absmax = torch.maximum(xmax.abs(), xmin.abs())
        scale = (2 * absmax / qmax).clamp(min=MIN_SCALE)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = ((xmax - xmin) / qmax).clamp(min=MIN_SCALE)
        # Large offsets only happen for constant groups; clamp keeps them finite (as OmniQuant does).
        zero_real = (-xmin / scale).clamp(-1e4, 1e4)
        zero = round_ste(zero_real) if ste else torch.round(zero_real)
    return scale, zero


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group_size: int, ste: bool = False) -> torch.Tensor:
    """Integer codes in [0, 2^b - 1] as a float tensor of shape (out, in / g, g)."""
    groups = grouped(weight, group_size)
    rounded = round_ste(groups / scale[..., None]) if ste else torch.round(groups / scale[..., None])
    return torch.clamp(rounded + zero[..., None], 0, 2 ** bits - 1)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(out, in / g, g) codes -> (out, in) weights."""
    weight = (codes - zero[..., None]) * scale[..., None]
    return weight.reshape(weight.shape[0], -1)


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                  gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None,
                  ste: bool = True, group_range: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """W_hat: quantize and dequantize in one differentiable step (STE rounding when ``ste``)."""
    if bits >= 16:
        return weight
    scale, zero = scale_and_zero(weight, bits, group_size, symmetric, gamma, beta, ste=ste, group_range=group_range)
    codes = quantize_codes(weight, scale, zero, bits, group_size, ste=ste)
    return dequantize_codes(codes, scale, zero)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False):
    """Plain round-to-nearest min/max quantization: (codes uint8 (out, in), scale, zero)."""
    with torch.no_grad():
        scale, zero = scale_and_zero(weight, bits, group_size, symmetric, ste=False)
        codes = quantize_codes(weight, scale, zero, bits, group_size)
    return codes.reshape(weight.shape).to(torch.uint8), scale, zero
