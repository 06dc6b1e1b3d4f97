"""Packing b-bit codes into bytes is an exact, size-optimal round trip."""

import pytest
import torch

from peftkit.quant.packing import pack_codes, packed_size, unpack_codes
from peftkit.quant.quantized_weight import QuantizedWeight
from peftkit.quant.uniform import rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(8, 64), (3, 7), (1, 1), (5, 13, 3)])
def test_round_trip_is_exact(bits, shape):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    n = codes.numel()
    assert packed.numel() == packed_size(n, bits) == (n + 7) // 8 * bits
    assert torch.equal(unpack_codes(packed, bits, shape), codes)


def test_extreme_codes_and_bit_layout():
    codes = torch.tensor([3, 0, 0, 0, 0, 0, 0, 3], dtype=torch.uint8)
    packed = pack_codes(codes, 2)
    # code j occupies bits [2j, 2j + 2) of a 16-bit little-endian word
    assert packed.tolist() == [3, 3 << 6]


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([4]), 2)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantized_weight_holds_its_codes_packed(bits):
    w = torch.randn(16, 64)
    codes, scale, zero = rtn_quantize(w, bits, 32)
    qw = QuantizedWeight("uniform", bits, 32, (16, 64), codes=codes, scales=scale, zeros=zero)
    assert qw.packed_codes.dtype == torch.uint8 and qw.packed_codes.numel() == 16 * 64 * bits // 8
    assert torch.equal(qw.codes, codes)
    expected = ((codes.float().reshape(16, 2, 32) - zero[..., None]) * scale[..., None]).reshape(16, 64)
    assert torch.equal(qw.dequantize(), expected)
