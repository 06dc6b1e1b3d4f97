"""NF quantization and LoftQ's alternation against straight-line references: each group is scaled by its largest
magnitude, and each LoftQ iteration quantizes W - s·B·A of the previous one, then takes the rank-r SVD of what
that quantization left."""

import pytest
import torch

from peftkit.quant.loftq import loftq_init
from peftkit.quant.normal_float import nf_dequantize, nf_levels, nf_quantize

GROUP = 16


def _weight(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 8, generator=g) @ torch.randn(8, 64, generator=g) / 4 + 0.3 * torch.randn(32, 64, generator=g)
    w[::2] -= 1.5  # rows whose largest magnitude is negative
    return w


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_scales_each_group_by_its_largest_magnitude_and_takes_the_nearest_level(bits):
    w = _weight(bits)
    codes, absmax = nf_quantize(w, bits, GROUP)
    groups = w.reshape(w.shape[0], -1, GROUP)
    expected_absmax = groups.abs().amax(-1)
    assert (groups.amax(-1) < expected_absmax).any()  # the negative extreme decides some groups
    torch.testing.assert_close(absmax, expected_absmax, rtol=0, atol=0)
    normalised = (groups / expected_absmax[..., None]).reshape(w.shape)
    nearest = (normalised[..., None] - nf_levels(bits)).abs().argmin(-1)
    assert torch.equal(codes.long(), nearest)
    expected = (nf_levels(bits)[nearest].reshape(groups.shape) * expected_absmax[..., None]).reshape(w.shape)
    torch.testing.assert_close(nf_dequantize(codes, absmax, bits, GROUP), expected, rtol=0, atol=0)


def _reference_loftq(w, bits, r, s, iters):
    """LoftQ written out: Q_t = NF(W - s B_{t-1} A_{t-1}); B_t, A_t = rank-r SVD of W - Q_t, sqrt(S) in each, B / s."""
    B, A = torch.zeros(w.shape[0], r), torch.zeros(r, w.shape[1])
    for _ in range(iters):
        codes, absmax = nf_quantize(w - s * (B @ A), bits, GROUP)
        q = nf_dequantize(codes, absmax, bits, GROUP)
        U, S, Vh = torch.linalg.svd(w - q, full_matrices=False)
        B, A = U[:, :r] * S[:r].sqrt() / s, S[:r].sqrt()[:, None] * Vh[:r]
    return q, A, B


@pytest.mark.parametrize("iters", [2, 3])
def test_loftq_iterations_quantize_the_weight_minus_the_previous_lora(iters):
    w, r, s = _weight(), 4, 3.0
    quantized, A, B = loftq_init(w, 2, GROUP, r, s, iters)
    q_ref, A_ref, B_ref = _reference_loftq(w, 2, r, s, iters)
    q_first, _, _ = _reference_loftq(w, 2, r, s, 1)
    assert not torch.equal(q_ref, q_first)  # the alternation changes the quantized weight
    torch.testing.assert_close(quantized.dequantize(), q_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(s * (B @ A), s * (B_ref @ A_ref), rtol=1e-4, atol=1e-5)
