"""Uniform group quantizer and QuantLinear: 16-bit = FP, LWC off + B=0 = RTN, levels, STE gradients."""

import torch
from torch import nn

from peftkit.quant.qlinear import QuantLinear
from peftkit.quant.uniform import (
    dequantize_codes,
    fake_quantize,
    grouped,
    rtn_quantize,
    scale_and_zero,
)


def _linear(out=24, inp=64, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(inp, out)


def test_bits_none_is_the_fp_layer():
    lin = _linear()
    x = torch.randn(3, 5, 64)
    q = QuantLinear(lin, bits=None, group_size=16, r=4, scaling=2.0)
    assert torch.equal(q(x), lin(x))  # B = 0 and no quantization
    assert torch.equal(q.export().dequantize(), lin.weight)


def test_lwc_off_and_zero_B_is_rtn():
    lin = _linear()
    x = torch.randn(4, 64)
    codes, scale, zero = rtn_quantize(lin.weight, 2, 16)
    w_rtn = dequantize_codes(grouped(codes.float(), 16), scale, zero)
    plain = QuantLinear(lin, bits=2, group_size=16, lwc=False, r=8, scaling=2.0)
    torch.testing.assert_close(plain(x), nn.functional.linear(x, w_rtn, lin.bias), rtol=0, atol=1e-6)
    # A learnable-clipping layer in its RTN fall-back state is the same quantizer.
    clipped = QuantLinear(lin, bits=2, group_size=16, lwc=True, r=8, scaling=2.0)
    clipped.set_rtn_state()
    torch.testing.assert_close(clipped(x), plain(x), rtol=0, atol=0)
    assert torch.equal(clipped.export().codes, codes)


def test_each_group_uses_at_most_2_pow_b_levels_and_rounds_to_nearest():
    w = _linear(8, 64).weight.detach()
    for bits in (2, 3, 4):
        w_hat = fake_quantize(w, bits, 16, ste=False)
        for row in grouped(w_hat, 16).reshape(-1, 16):
            assert row.unique().numel() <= 2 ** bits
        scale, _ = scale_and_zero(w, bits, 16, ste=False)
        # No clipping: every weight is inside [min, max], so the error is at most half a step, plus the grid's
        # stretch from rounding the step to fp16 (relative 2^-11 over 2^b - 1 steps).
        bound = scale[..., None] * (0.5 + (2 ** bits - 1) * 2 ** -11)
        assert ((grouped(w_hat - w, 16).abs() - bound) <= 1e-6).all()


def test_symmetric_has_fixed_zero_point_and_covers_absmax():
    w = _linear(8, 64).weight.detach()
    scale, zero = scale_and_zero(w, 4, 16, symmetric=True, ste=False)
    assert torch.all(zero == 8)
    torch.testing.assert_close(scale * 15 / 2, grouped(w, 16).abs().amax(-1), rtol=1e-3, atol=0)  # fp16 scales


def test_clipping_logits_get_gradients_through_the_ste():
    lin = _linear()
    q = QuantLinear(lin, bits=3, group_size=16, lwc=True, r=4, scaling=1.0)
    x = torch.randn(6, 64)
    (q(x) - lin(x)).pow(2).mean().backward()
    assert q.gamma.grad.abs().sum() > 0 and q.beta.grad.abs().sum() > 0
    assert q.lora_B.grad.abs().sum() > 0 and q.weight.grad is None


def test_freeze_uses_exactly_the_stored_codes():
    q = QuantLinear(_linear(), bits=3, group_size=32, lwc=True, r=4, scaling=1.0)
    with torch.no_grad():
        q.gamma.uniform_(-1, 5)
        q.beta.uniform_(-1, 5)
    stored = q.freeze()
    assert torch.equal(q.quantized_weight(), stored.dequantize())
    assert not any(p.requires_grad for p in q.parameters())
