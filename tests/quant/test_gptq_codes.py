"""Calibration trains exactly what a GPTQ checkpoint stores: fp16 scales, zero points inside the code range,
and a fake-quant weight equal bit for bit to the dequantized exported codes. The fused fake quantizer's
gradients match autograd on the plain expression."""

import pytest
import torch
from torch import nn

from peftkit.quant.qlinear import QuantLinear
from peftkit.quant.uniform import grouped, rtn_quantize, scale_and_zero


def _layer(bits, symmetric=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(128, 40)
    with torch.no_grad():
        lin.weight[:3] = lin.weight[:3].abs() + 0.05  # all-positive groups: -xmin / scale < 0 (zero point clamps to 0)
        lin.weight[3:6] = -lin.weight[3:6].abs() - 0.05  # all-negative groups: the zero point clamps to 2^b - 1
        lin.weight[6, :32] = 0.3  # a constant group
    q = QuantLinear(lin, bits, 32, symmetric=symmetric, lwc=True, r=4)
    with torch.no_grad():
        q.gamma.uniform_(-3, 5)
        q.beta.uniform_(-3, 5)
    return q


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fake_quant_weight_is_the_dequantized_export_bit_for_bit(bits, symmetric):
    q = _layer(bits, symmetric)
    stored = q.export()
    qmax = 2 ** bits - 1
    assert torch.equal(stored.scales, stored.scales.half().float())  # what an fp16 scale tensor holds
    assert torch.equal(stored.zeros, stored.zeros.round())
    assert stored.zeros.min() >= 0 and stored.zeros.max() <= qmax
    assert stored.codes.max() <= qmax
    # The training forward (STE path) and a straight-line dequantization of the stored integers agree exactly.
    codes = grouped(stored.codes.float(), 32)
    by_hand = ((codes - stored.zeros[..., None]) * stored.scales[..., None]).reshape(q.weight.shape)
    assert torch.equal(q.quantized_weight(), by_hand)
    assert torch.equal(stored.dequantize(), by_hand)
    # ... and through the stored fp16 scales and integer zeros (a GPTQ loader's view of the same numbers).
    from_fp16 = ((codes - stored.zeros.to(torch.int16).float()[..., None])
                 * stored.scales.half().float()[..., None]).reshape(q.weight.shape)
    assert torch.equal(q.quantized_weight(), from_fp16)


def test_zero_points_are_clamped_where_a_group_does_not_straddle_zero():
    q = _layer(2)
    zeros = q.export().zeros
    assert (zeros[:3] == 0).all() and (zeros[3:6] == 3).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_codes_are_gptq_storable(bits):
    w = _layer(bits).weight.detach()
    codes, scale, zero = rtn_quantize(w, bits, 32)
    assert torch.equal(scale, scale.half().float())
    assert zero.min() >= 0 and zero.max() <= 2 ** bits - 1 and torch.equal(zero, zero.round())
    # scale is the fp16 rounding of the min/max step (no clipping)
    g = grouped(w, 32)
    step = ((g.amax(-1) - g.amin(-1)) / (2 ** bits - 1)).clamp(min=1e-5)
    assert torch.equal(scale, step.half().float())
    assert codes.dtype == torch.uint8


def _plain_fake_quant(q: QuantLinear):
    """The unfused expression, differentiated by autograd (round straight-through via x + (round(x) - x).detach())."""
    def ste(x):
        return x + (torch.round(x) - x).detach()

    qmax = 2 ** q.bits - 1
    g = grouped(q.weight, q.group_size)
    xmax = torch.sigmoid(q.gamma) * g.amax(-1)
    xmin = torch.sigmoid(q.beta) * g.amin(-1)
    s = ((xmax - xmin) / qmax).clamp(min=1e-5)
    s = s + (s.half().float() - s).detach()
    z = ste(-xmin / s).clamp(0, qmax)
    k = (ste(g / s[..., None]) + z[..., None]).clamp(0, qmax)
    return ((k - z[..., None]) * s[..., None]).reshape(q.weight.shape)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fused_fake_quant_gradients_match_autograd_on_the_plain_expression(bits):
    q = _layer(bits)
    upstream = torch.randn(q.weight.shape, generator=torch.Generator().manual_seed(1))
    fused = torch.autograd.grad((q.quantized_weight() * upstream).sum(), [q.gamma, q.beta])
    plain_w = _plain_fake_quant(q)
    assert torch.equal(plain_w, q.quantized_weight())
    plain = torch.autograd.grad((plain_w * upstream).sum(), [q.gamma, q.beta])
    for a, b in zip(fused, plain):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_scale_rounding_is_straight_through():
    w = _layer(3).weight.detach()
    gamma = torch.full((40, 4), 1.0, requires_grad=True)
    scale, _ = scale_and_zero(w, 3, 32, symmetric=True, gamma=gamma, beta=None)
    scale.sum().backward()
    assert torch.equal(scale, scale.half().float()) and gamma.grad.abs().sum() > 0
