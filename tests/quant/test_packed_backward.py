"""The packed Linear's training path: the transposed unpack against the reference dequantization, its gradients
against autograd through the dequantized weight, what it saves for backward, and how often gradient checkpointing
makes it unpack."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from peftkit.quant.gptq_format import dequantize_gptq, to_gptq
from peftkit.quant.packed_linear import PackedLinear
from peftkit.quant.packing import unpack_gptq_t
from peftkit.quant.quantized_weight import QuantizedWeight


def _layer(bits, out_features=96, in_features=128, group=32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (out_features, in_features), generator=g)
    scales = (torch.rand(out_features, in_features // group, generator=g) * 0.1 + 1e-3).half().float()
    scales[0, 0] = 65504 / 2 ** bits  # near float16's largest value: the product still rounds as float16 does
    zeros = torch.randint(0, 2 ** bits, (out_features, in_features // group), generator=g).float()
    quantized = QuantizedWeight("uniform", bits, group, (out_features, in_features), codes=codes.to(torch.uint8),
                                scales=scales, zeros=zeros)
    return PackedLinear.from_quantized(quantized, torch.randn(out_features, generator=g) if bias else None), quantized


def _textbook(quantized, dtype):
    """scale * (code - zero), exact in float32, rounded once to a 16-bit dtype; float32 keeps GPTQ's float16 value."""
    exact = quantized.dequantize()
    return exact.to(dtype) if dtype in (torch.float16, torch.bfloat16) else exact.half().to(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_transposed_unpack_equals_the_reference_dequantization(bits, dtype):
    layer, quantized = _layer(bits, seed=bits)
    assert layer._fast_gptq == (bits != 3)  # 3-bit codes straddle bytes: the general path
    reference = dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, dtype)
    got = layer.unpack_t(dtype)
    assert got.dtype == dtype and got.shape == (128, 96)
    if dtype == torch.bfloat16 and bits != 3:
        # one rounding of the exact value, where the reference rounds to float16 first: one unit apart at most
        assert torch.equal(got.T, _textbook(quantized, dtype))
        torch.testing.assert_close(got.T, reference, rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(got.T, reference)
        assert torch.equal(got.T, quantized.dequantize().half().to(dtype))


def test_groups_of_one_word_and_wide_layers_unpack_bit_for_bit():
    for bits, group in [(2, 16), (4, 8), (8, 4)]:
        layer, quantized = _layer(bits, out_features=64, in_features=64, group=group, seed=group)
        assert layer._fast_gptq
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(layer.unpack_t(dtype).T, _textbook(quantized, dtype))


def test_reordered_columns_take_the_general_path():
    layer, _ = _layer(4)
    layer.g_idx = layer.g_idx.flip(0).contiguous()  # act-order: column i in group g_idx[i]
    relaid = PackedLinear("gptq", 4, 32, 128, 96, {k: getattr(layer, k) for k in ("qweight", "qzeros", "scales", "g_idx")})
    assert not relaid._fast_gptq
    assert torch.equal(relaid.unpack_t(torch.float32).T, relaid.unpack(torch.float32))


def test_unpack_reads_what_to_gptq_writes_at_the_model_shapes():
    """unpack_gptq_t on tensors written by to_gptq at smollm2's shapes and group sizes (the quantizers' output)."""
    g = torch.Generator().manual_seed(3)
    for out_features, in_features, group in [(32, 64, 64), (192, 576, 64), (64, 1536, 128)]:
        codes = torch.randint(0, 4, (out_features, in_features), generator=g)
        scales = torch.rand(out_features, in_features // group, generator=g).half().float()
        zeros = torch.randint(0, 4, (out_features, in_features // group), generator=g).float()
        t = to_gptq(codes, scales, zeros, 2, group)
        expected = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 2, torch.float16)
        assert torch.equal(unpack_gptq_t(t["qweight"], t["qzeros"], t["scales"], 2, group, torch.float16).T, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_autograd_through_the_dequantized_weight(dtype):
    layer, quantized = _layer(2, seed=5)
    x = torch.randn(4, 7, 128, dtype=dtype, requires_grad=True)
    upstream = torch.randn(4, 7, 96, dtype=dtype)
    (layer(x) * upstream).sum().backward()
    reference_x = x.detach().clone().requires_grad_(True)
    weight = _textbook(quantized, dtype).requires_grad_(True)  # autograd through the dequantized weight
    reference = torch.nn.functional.linear(reference_x, weight, layer.bias.to(dtype))
    (reference * upstream).sum().backward()
    torch.testing.assert_close(layer(x.detach()), reference.detach())
    torch.testing.assert_close(x.grad, reference_x.grad)


def _saved_bytes(fn):
    """Bytes of every tensor autograd saves for backward while ``fn`` runs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_forward_saves_neither_a_float_weight_nor_the_input(dtype):
    layer, _ = _layer(2, out_features=256, in_features=256, group=64)
    x = torch.randn(2, 3, 256, dtype=dtype, requires_grad=True)
    out, sizes = _saved_bytes(lambda: layer(x))
    # the frozen weight gets no gradient, so its input is not needed either: the backward unpacks W again
    assert sizes == []
    out.sum().backward()
    assert x.grad is not None
    # the check can see a saved weight: a plain Linear with a frozen weight saves it for its input gradient
    plain = torch.nn.Linear(256, 256).to(dtype).requires_grad_(False)
    _, plain_sizes = _saved_bytes(lambda: plain(x))
    assert 256 * 256 * x.element_size() in plain_sizes


class _Counting(torch.nn.Module):
    """Two packed layers, counting their unpacks."""

    def __init__(self):
        super().__init__()
        self.first, _ = _layer(2, out_features=128, in_features=128, seed=1)
        self.second, _ = _layer(2, out_features=128, in_features=128, seed=2)
        self.unpacks = 0
        for layer in (self.first, self.second):
            original = layer.unpack_t

            def counted(dtype=torch.float32, _original=original):
                self.unpacks += 1
                return _original(dtype)

            layer.unpack_t = counted

    def forward(self, x):
        return self.second(torch.nn.functional.silu(self.first(x)))


@pytest.mark.parametrize("checkpointing", ["none", "non-reentrant", "reentrant"])
def test_a_step_unpacks_each_layer_twice_with_or_without_checkpointing(checkpointing):
    model = _Counting()
    x = torch.randn(3, 128, requires_grad=True)
    if checkpointing == "none":
        out = model(x)
    else:
        out = checkpoint(model, x, use_reentrant=checkpointing == "reentrant")
    out.square().sum().backward()
    assert model.unpacks == 4  # forward and backward (or forward and its rerun), per layer
    reference_x = x.detach().clone().requires_grad_(True)
    plain = _Counting()
    plain(reference_x).square().sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=0, atol=0)


def test_without_the_private_hooks_the_backward_unpacks_again(monkeypatch):
    """Where torch's saved-tensor hook internals are missing, checkpointing still gives the same gradients (one more
    unpack per layer)."""
    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    model = _Counting()
    x = torch.randn(3, 128, requires_grad=True)
    checkpoint(model, x, use_reentrant=False).square().sum().backward()
    # forward 2, backward 2, and the rerun of the first layer only: the rerun stops at the last tensor it must
    # rebuild (silu's input), and the second layer, saving nothing, is not rerun
    assert model.unpacks == 5
    reference_x = x.detach().clone().requires_grad_(True)
    _Counting()(reference_x).square().sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_unpacked_weight_stays_valid_after_the_next_unpack(dtype):
    """Unpacks reuse scratch buffers for their temporaries: what one returns must not point into them."""
    first, _ = _layer(2, seed=1)
    second, _ = _layer(2, seed=2)
    weight = first.unpack_t(dtype)
    before = weight.clone()
    second.unpack_t(dtype)
    assert torch.equal(weight, before)


def test_an_unpack_under_inference_mode_does_not_break_the_next_training_step(monkeypatch):
    """An evaluation under torch.inference_mode between training steps leaves scratch buffers that are inference
    tensors; the next unpack outside it must still work."""
    from peftkit.quant import packing

    monkeypatch.setattr(packing, "_SCRATCH", {})  # the first buffers are made under inference_mode
    layer, quantized = _layer(2, out_features=160, in_features=192, group=32, seed=9)
    with torch.inference_mode():
        layer.unpack_t(torch.float32)
    x = torch.randn(2, 192, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(layer.unpack_t(torch.float32).T, _textbook(quantized, torch.float32))
