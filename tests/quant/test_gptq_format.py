"""The GPTQ layout against GPTQModel's own reader, and the packed Linear's backward against autograd."""

import pytest
import torch

from peftkit.quant.gptq_format import dequantize_gptq, from_gptq, to_gptq
from peftkit.quant.packed_linear import PackedLinear
from peftkit.quant.quantized_weight import QuantizedWeight


def _random_quantized(bits, out_features=96, in_features=128, group=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (out_features, in_features), generator=g)
    scales = (torch.rand(out_features, in_features // group, generator=g) * 0.1 + 1e-3).half().float()
    zeros = torch.randint(0, 2 ** bits, (out_features, in_features // group), generator=g).float()
    zeros[0] = 0  # the zero point that the old gptq (v1) layout cannot store
    zeros[1] = 2 ** bits - 1
    return codes, scales, zeros


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_scales_and_zeros_round_trip_bit_exactly(bits):
    codes, scales, zeros = _random_quantized(bits)
    tensors = to_gptq(codes, scales, zeros, bits, 32)
    assert tensors["qweight"].dtype == torch.int32 and tensors["qweight"].shape == (128 * bits // 32, 96)
    assert tensors["qzeros"].shape == (128 // 32, 96 * bits // 32) and tensors["scales"].dtype == torch.float16
    back_codes, back_scales, back_zeros = from_gptq(tensors, bits)
    assert torch.equal(back_codes.long(), codes)
    assert torch.equal(back_zeros.float(), zeros)
    assert torch.equal(back_scales.float(), scales)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptqmodel_reads_the_same_weight(bits):
    """GPTQModel's own torch kernel (an independent unpacker) dequantizes our tensors to our weight, bit for bit."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    codes, scales, zeros = _random_quantized(bits, seed=bits)
    tensors = to_gptq(codes, scales, zeros, bits, 32)
    theirs = TorchLinear(bits=bits, group_size=32, sym=False, desc_act=False, in_features=128, out_features=96,
                         bias=False, register_buffers=True)
    for name, value in tensors.items():
        getattr(theirs, name).copy_(value)
    theirs.post_init()
    ours = dequantize_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits,
                           torch.float16)
    assert torch.equal(theirs.dequantize_weight().T, ours)
    # and it is the textbook value: scale * (code - zero), rounded to float16 once
    expected = ((codes.reshape(96, 4, 32) - zeros[..., None]) * scales[..., None]).reshape(96, 128).half()
    assert torch.equal(ours, expected)


def test_out_of_range_zero_points_and_unpackable_shapes_are_refused():
    codes, scales, zeros = _random_quantized(2)
    with pytest.raises(ValueError, match="zero points"):
        to_gptq(codes, scales, zeros - 1, 2, 32)
    with pytest.raises(ValueError, match="32-bit words"):
        to_gptq(codes[:, :96][:40], scales[:40, :3], zeros[:40, :3], 3, 32)


@pytest.mark.parametrize("kind", ["uniform", "nf"])
def test_packed_linear_gradients_match_autograd_and_keep_no_unpacked_weight(kind):
    codes, scales, zeros = _random_quantized(4, seed=7)
    if kind == "uniform":
        quantized = QuantizedWeight("uniform", 4, 32, (96, 128), codes=codes.to(torch.uint8), scales=scales, zeros=zeros)
    else:
        quantized = QuantizedWeight("nf", 4, 32, (96, 128), codes=codes.to(torch.uint8), scales=scales)
    bias = torch.randn(96)
    layer = PackedLinear.from_quantized(quantized, bias)
    weight = layer.unpack()
    if kind == "uniform":
        assert torch.equal(weight, quantized.dequantize().half().float())
    else:
        assert torch.equal(weight, quantized.dequantize())
    x = torch.randn(3, 5, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    (y.square().sum()).backward()
    reference_x = x.detach().clone().requires_grad_(True)
    reference = torch.nn.functional.linear(reference_x, weight, bias)
    (reference.square().sum()).backward()
    torch.testing.assert_close(y, reference, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-6, atol=1e-6)
    assert max(saved, default=0) < weight.numel()  # nothing weight-sized is kept for backward
