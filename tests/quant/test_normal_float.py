"""NF2/NF3/NF4 levels and the absmax group quantizer; NF4 agrees with bitsandbytes."""

import pytest
import torch

from peftkit.quant.normal_float import (
    NF4_LEVELS,
    bnb_nf4_fake_quantize,
    constructed_levels,
    nf_dequantize,
    nf_levels,
    nf_quantize,
)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_levels_are_normal_quantiles_with_exact_zero(bits):
    levels = nf_levels(bits)
    assert levels.numel() == 2 ** bits
    assert torch.all(levels[1:] > levels[:-1])
    assert levels[0] == -1 and levels[-1] == 1 and (levels == 0).sum() == 1
    assert (levels > 0).sum() == 2 ** (bits - 1)  # one more positive than negative level


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_each_weight_takes_the_nearest_level(bits):
    w = torch.randn(4, 64)
    codes, absmax = nf_quantize(w, bits, 16)
    normalised = (w.reshape(4, 4, 16) / absmax[..., None]).reshape(4, 64)
    brute = (normalised[..., None] - nf_levels(bits)).abs().argmin(-1)
    assert torch.equal(codes.long(), brute)
    w_hat = nf_dequantize(codes, absmax, bits, 16)
    # the group absmax is represented exactly (level +-1)
    torch.testing.assert_close(w_hat.reshape(4, 4, 16).abs().amax(-1), absmax)


def test_nf4_matches_bitsandbytes():
    w = torch.randn(32, 128)
    theirs = bnb_nf4_fake_quantize(w, 64)
    if theirs is None:
        pytest.skip("bitsandbytes NF4 not available on this device")
    codes, absmax = nf_quantize(w, 4, 64)
    torch.testing.assert_close(nf_dequantize(codes, absmax, 4, 64), theirs, rtol=0, atol=1e-5)


def test_nf4_levels_are_bitsandbytes_table_bit_for_bit():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    # bitsandbytes decodes nf4 with this table whatever quant_map a checkpoint stores, so it must be equal exactly
    assert torch.equal(nf_levels(4), bnbf.get_4bit_type("nf4", device="cpu").float())


def test_nf4_table_is_the_normal_quantile_construction_to_float32_precision():
    built = torch.tensor(constructed_levels(4), dtype=torch.float64)
    table = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    assert torch.equal(nf_levels(4).double(), table.float().double())
    assert (built - table).abs().max() < 1.2e-7  # within one float32 step at |x| <= 1
