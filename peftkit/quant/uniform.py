"""Uniform b-bit group-wise quantization with learnable weight clipping (LWC, as in OmniQuant/ApiQ).

A group is ``group_size`` consecutive input columns of one output row. Per group:

  xmax = sigmoid(gamma) * max(W_g),  xmin = sigmoid(beta) * min(W_g)     (gamma, beta learnable, init 4.0)
  asymmetric: scale = fp16(clamp((xmax - xmin) / (2^b - 1), 1e-5)),  zero = clamp(round(-xmin / scale), 0, 2^b - 1)
  symmetric:  scale = fp16(clamp(2 * max(|xmax|, |xmin|) / (2^b - 1), 1e-5)),  zero = 2^(b-1)   (GPTQ's convention,
              so that packed-int kernels can assume a fixed zero point)
  codes = clamp(round(W / scale) + zero, 0, 2^b - 1),  W_hat = (codes - zero) * scale

The scale is rounded to the nearest fp16 value and the zero point kept inside the code range because
that is what a GPTQ checkpoint can store (fp16 scales, zero points packed in b bits): calibration then
trains the very weight that is exported, and dequantizing the exported codes gives W_hat bit for bit.

Rounding (of the codes, the zero point and the scale to fp16) uses a straight-through estimator while
training, so gradients reach gamma and beta through the scale. Without clipping logits (``gamma=None``)
this is plain round-to-nearest (RTN). ``fake_quantize`` computes codes and W_hat in one autograd node
whose backward is written out (a handful of element-wise kernels instead of a graph of a dozen).
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


class _Fp16STE(torch.autograd.Function):
    """x rounded to the nearest fp16 value (kept in x's dtype) forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity in the backward pass (straight-through estimator)."""
    return _RoundSTE.apply(x)


def fp16_round(x: torch.Tensor, ste: bool = True) -> torch.Tensor:
    """x rounded to fp16 precision, in x's dtype (straight-through when ``ste``)."""
    return _Fp16STE.apply(x) if ste else x.to(torch.float16).to(x.dtype)


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, in / g, g): the groups of each row."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not divisible by group_size {group_size}")
    return weight.reshape(out_features, in_features // group_size, group_size)


def group_range(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, min) of each group, each (out, in / g)."""
    groups = grouped(weight, group_size)
    return groups.amax(dim=-1), groups.amin(dim=-1)


def scale_and_zero(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                   gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None,
                   ste: bool = True, group_range: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale (fp16-representable) and zero point (an integer in [0, 2^b - 1]), each (out, in / g).
    Differentiable in gamma/beta (and W).

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
        scale = fp16_round((2 * absmax / qmax).clamp(min=MIN_SCALE), ste)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = fp16_round(((xmax - xmin) / qmax).clamp(min=MIN_SCALE), ste)
        zero_real = -xmin / scale
        zero = (round_ste(zero_real) if ste else torch.round(zero_real)).clamp(0, qmax)
    return scale, zero


def _codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, round(W / scale) + zero before the clamp) for (out, n, g) groups; the one place codes are computed."""
    unclamped = (groups / scale[..., None]).round_().add_(zero[..., None])
    return unclamped.clamp(0, qmax), unclamped


class _FakeQuant(torch.autograd.Function):
    """W_hat = (clamp(round(W / s) + z, 0, q) - z) * s with straight-through rounding.

    With c = round(W / s) + z, inside = [0 <= c <= q] and k = clamp(c, 0, q):
      dW_hat/dW = inside,  dW_hat/ds = (k - z) - inside * W / s,  dW_hat/dz = s * (inside - 1)
    (the last two summed over each group), which is what autograd derives from the unfused expression.
    dW_hat/ds is formed in the forward pass from the tensors it already holds.
    """

    @staticmethod
    def forward(ctx, groups, scale, zero, qmax):
        s, z = scale[..., None], zero[..., None]
        ratio = groups / s
        unclamped = torch.round(ratio).add_(z)
        codes = unclamped.clamp(0, qmax)
        steps = codes.sub_(z)  # k - z
        w_hat = steps * s
        inside = unclamped.sub_(z).eq_(steps)  # 1.0 where the clamp left the code alone, else 0.0
        dscale = torch.addcmul(steps, ratio, inside, value=-1) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(dscale, inside if ctx.needs_input_grad[0] or ctx.needs_input_grad[2] else None, scale)
        return w_hat

    @staticmethod
    def backward(ctx, grad):
        dscale, inside, scale = ctx.saved_tensors
        grad_groups = grad_scale = grad_zero = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * dscale).sum(dim=-1)
        if ctx.needs_input_grad[2]:
            grad_zero = torch.addcmul(grad, grad, inside, value=-1).sum(dim=-1).mul_(scale).neg_()
        if ctx.needs_input_grad[0]:
            grad_groups = grad * inside
        return grad_groups, grad_scale, grad_zero, None


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group_size: int, ste: bool = False) -> torch.Tensor:
    """Integer codes in [0, 2^b - 1] as a float tensor of shape (out, in / g, g)."""
    groups = grouped(weight, group_size)
    if ste:
        rounded = round_ste(groups / scale[..., None])
        return torch.clamp(rounded + zero[..., None], 0, 2 ** bits - 1)
    return _codes(groups, scale, zero, 2 ** bits - 1)[0]


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, flat: bool = True) -> torch.Tensor:
    """(out, in / g, g) codes -> (out, in) weights ((out, in / g, g) when not ``flat``)."""
    weight = (codes - zero[..., None]) * scale[..., None]
    return weight.reshape(weight.shape[0], -1) if flat else weight


def fake_quantize(weight: torch.Tensor, bits: int | None, group_size: int, symmetric: bool = False,
                  gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None,
                  ste: bool = True, group_range: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """W_hat: quantize and dequantize in one differentiable step (STE rounding when ``ste``).

    Forward, it equals dequantize_codes(quantize_codes(W, scale, zero)) bit for bit, whatever ``ste``."""
    if bits is None:  # not quantized
        return weight
    scale, zero = scale_and_zero(weight, bits, group_size, symmetric, gamma, beta, ste=ste, group_range=group_range)
    groups = grouped(weight, group_size)
    if ste:
        w_hat = _FakeQuant.apply(groups, scale, zero, 2 ** bits - 1)
    else:
        w_hat = dequantize_codes(_codes(groups, scale, zero, 2 ** bits - 1)[0], scale, zero, flat=False)
    return w_hat.reshape(weight.shape)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False):
    """Plain round-to-nearest min/max quantization: (codes uint8 (out, in), scale, zero), scales fp16-exact
    and zeros in [0, 2^b - 1] as a GPTQ checkpoint stores them."""
    with torch.no_grad():
        scale, zero = scale_and_zero(weight, bits, group_size, symmetric, ste=False)
        codes = quantize_codes(weight, scale, zero, bits, group_size)
    return codes.reshape(weight.shape).to(torch.uint8), scale, zero
