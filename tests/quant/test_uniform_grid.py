"""The uniform quantizer's grid against a straight-line reference: 2^b levels (codes 0 .. 2^b - 1, both used), an
integer zero point round(-xmin / scale) inside the code range, W_hat = scale * (q - zero), and the GPTQ tensors
decoding to that same weight."""

import pytest
import torch

from peftkit.quant.gptq_format import dequantize_gptq, from_gptq, to_gptq
from peftkit.quant.packing import pack_codes, unpack_codes
from peftkit.quant.uniform import fake_quantize, rtn_quantize, scale_and_zero

GROUP = 16


def _weight(seed=0, out=32, inp=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[::3] += 0.04  # rows whose groups do not straddle zero: zero points at the edges of the range
    w[1::5] -= 0.06
    return w


def _reference(w, bits, gamma=None, beta=None, symmetric=False):
    """(codes, scale, zero, W_hat) written out step by step from the specification."""
    qmax = 2 ** bits - 1
    groups = w.reshape(w.shape[0], -1, GROUP)
    xmax, xmin = groups.amax(-1), groups.amin(-1)
    if gamma is not None:
        xmax, xmin = torch.sigmoid(gamma) * xmax, torch.sigmoid(beta) * xmin
    if symmetric:
        scale = (2 * torch.maximum(xmax.abs(), xmin.abs()) / qmax).clamp(min=1e-5).half().float()
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        scale = ((xmax - xmin) / qmax).clamp(min=1e-5).half().float()
        zero = torch.round(-xmin / scale).clamp(0, qmax)
    codes = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp(0, qmax)
    w_hat = (scale[..., None] * (codes - zero[..., None])).reshape(w.shape)
    return codes.reshape(w.shape), scale, zero, w_hat


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_uses_exactly_2_pow_b_levels_from_0_to_2_pow_b_minus_1(bits):
    w = _weight()
    codes, scale, zero = rtn_quantize(w, bits, GROUP)
    assert codes.dtype == torch.uint8
    assert sorted(codes.unique().tolist()) == list(range(2 ** bits))  # every level used, none beyond
    groups = codes.reshape(w.shape[0], -1, GROUP).long()
    # min/max RTN maps each group's min to code 0 and its max to code 2^b - 1 (up to the zero point's rounding)
    assert groups.amax(-1).max() == 2 ** bits - 1 and groups.amin(-1).min() == 0


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_codes_scales_zeros_and_dequantized_weight_equal_the_reference(bits, symmetric):
    w = _weight(seed=bits)
    codes, scale, zero = rtn_quantize(w, bits, GROUP, symmetric)
    ref_codes, ref_scale, ref_zero, ref_w_hat = _reference(w, bits, symmetric=symmetric)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    torch.testing.assert_close(zero, ref_zero, rtol=0, atol=0)
    torch.testing.assert_close(codes.float(), ref_codes, rtol=0, atol=0)
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 2 ** bits - 1
    for ste in (True, False):
        torch.testing.assert_close(fake_quantize(w, bits, GROUP, symmetric, ste=ste), ref_w_hat, rtol=0, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3])
def test_zero_point_is_round_to_nearest_not_floor_or_ceil(bits):
    w = _weight(seed=7)
    _, zero = scale_and_zero(w, bits, GROUP, ste=False)
    scale, _ = scale_and_zero(w, bits, GROUP, ste=False)
    real = -w.reshape(w.shape[0], -1, GROUP).amin(-1) / scale
    inside = (real > 0.5) & (real < 2 ** bits - 1.5)
    frac = real - real.floor()
    assert ((frac > 0.1) & (frac < 0.4) & inside).any() and ((frac > 0.6) & (frac < 0.9) & inside).any()
    torch.testing.assert_close(zero[inside], torch.round(real[inside]), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 4])
def test_clipped_weights_saturate_at_code_0_and_2_pow_b_minus_1(bits):
    """Learned clipping shrinks the range: the weights outside it take the end codes, never a code beyond."""
    w = _weight(seed=3)
    n_groups = w.shape[1] // GROUP
    gamma = torch.full((w.shape[0], n_groups), -1.0)  # sigmoid(-1) ~ 0.27 of the max: many weights clamp
    beta = torch.full((w.shape[0], n_groups), -1.0)
    _, _, _, ref_w_hat = _reference(w, bits, gamma, beta)
    w_hat = fake_quantize(w, bits, GROUP, gamma=gamma, beta=beta, ste=False)
    torch.testing.assert_close(w_hat, ref_w_hat, rtol=0, atol=1e-7)
    scale, zero = scale_and_zero(w, bits, GROUP, gamma=gamma, beta=beta, ste=False)
    levels = (w_hat.reshape(w.shape[0], -1, GROUP) / scale[..., None] + zero[..., None]).round()
    assert levels.min() == 0 and levels.max() == 2 ** bits - 1


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_tensors_decode_to_scale_times_code_minus_zero(bits):
    w = _weight(seed=11)
    codes, scale, zero = rtn_quantize(w, bits, GROUP)
    tensors = to_gptq(codes, scale, zero, bits, GROUP)
    got_codes, got_scales, got_zeros = from_gptq(tensors, bits)
    assert torch.equal(got_codes.long(), codes.long()) and torch.equal(got_zeros.long(), zero.long())
    # reference: the float16 product scale * (q - z) per group, column by column
    index = torch.arange(w.shape[1]) // GROUP
    expected = (scale.half()[:, index] * (codes.long() - zero.long()[:, index]).half()).float()
    weight = dequantize_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits)
    torch.testing.assert_close(weight, expected, rtol=0, atol=0)
    assert got_scales.dtype == torch.float16


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packed_bytes_hold_codes_little_endian_b_bits_each(bits):
    codes = torch.arange(16) % (2 ** bits)
    packed = pack_codes(codes, bits)
    stream = sum(int(c) << (bits * j) for j, c in enumerate(codes[:8]))  # the first 8 codes fill `bits` bytes
    assert packed[:bits].tolist() == [(stream >> (8 * k)) & 0xFF for k in range(bits)]
    assert torch.equal(unpack_codes(packed, bits, codes.shape).long(), codes)


def test_rtn_method_of_the_pipeline_is_plain_min_max_rtn():
    """quantize_model's RTN stores exactly rtn_quantize's codes, scales and zeros (no learned clipping, B = 0)."""
    from helpers.quant import options, structured_llama

    from peftkit.quant.pipeline import quantize_model

    model = structured_llama(layers=1)
    result = quantize_model(model, options("rtn", bits=2, group_size=GROUP), None, log=lambda s: None)
    for name, stored in result.weights.items():
        codes, scale, zero = rtn_quantize(model.get_submodule(name).weight.detach(), 2, GROUP)
        assert torch.equal(stored.codes.reshape(codes.shape), codes), name
        assert torch.equal(stored.scales, scale) and torch.equal(stored.zeros, zero), name
        assert torch.count_nonzero(result.lora[name][1]) == 0
