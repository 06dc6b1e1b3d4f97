"""LoftQ: s·B·A is the rank-r SVD of the residual, and it reduces the error of plain NF quantization."""

import torch

from peftkit.quant.loftq import loftq_init
from peftkit.quant.normal_float import nf_fake_quantize


def _weight():
    g = torch.Generator().manual_seed(0)
    # low rank + noise, like pretrained weights
    return torch.randn(64, 8, generator=g) @ torch.randn(8, 128, generator=g) / 4 + 0.3 * torch.randn(64, 128, generator=g)


def test_one_iteration_is_the_svd_of_the_nf_residual():
    w, r, s = _weight(), 8, 16 / 8
    quantized, A, B = loftq_init(w, 2, 32, r, s, iters=1)
    residual = w - quantized.dequantize()
    U, S, Vh = torch.linalg.svd(residual)
    best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    torch.testing.assert_close(s * B @ A, best, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(quantized.dequantize(), nf_fake_quantize(w, 2, 32))
    # sqrt(S) split: A's rows and B's columns carry the same singular-value share
    torch.testing.assert_close(A.norm(dim=1), (B * s).norm(dim=0), rtol=1e-4, atol=1e-5)


def test_more_iterations_do_not_hurt_and_beat_plain_nf():
    w = _weight()
    errors = []
    for iters in (1, 5):
        quantized, A, B = loftq_init(w, 2, 32, 8, 2.0, iters)
        errors.append((w - quantized.dequantize() - 2.0 * B @ A).norm().item())
    plain = (w - nf_fake_quantize(w, 2, 32)).norm().item()
    assert errors[0] < plain
    assert errors[1] <= errors[0] * 1.01
