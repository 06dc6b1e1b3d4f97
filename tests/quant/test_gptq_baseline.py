"""The GPTQ baseline: what it stores is what GPTQModel's own packing and torch kernel decode, and its solver
(error compensation on the calibration windows) beats plain RTN on held-out windows."""

import os

import pytest
import torch
from helpers.quant import structured_llama, windows

from peftkit.quant.pipeline import apply_quantized_weights, quantize_model
from peftkit.quant.quantizers.gptq import gptq_codes


def _gptqmodel_decode(Q, scale, zero, bits, group):
    """GPTQModel's TorchLinear packs Q with (scale, zero) and dequantizes it again (its torch path)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    out_features, in_features = Q.shape
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = Q.clone()
    qlinear = TorchLinear(bits=bits, group_size=group, sym=False, desc_act=False, in_features=in_features,
                          out_features=out_features, bias=False)
    g_idx = torch.arange(in_features, dtype=torch.int32) // group
    qlinear.pack(linear, scale.clone(), zero.clone(), g_idx)
    return qlinear.dequantize_weight().T  # (out, in), fp16


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_stored_codes_decode_under_gptqmodel_to_our_weights(bits):
    g = torch.Generator().manual_seed(bits)
    out_features, in_features, group = 64, 128, 32
    scale = torch.rand(out_features, in_features // group, generator=g) * 0.05 + 0.01  # fp32, as GPTQ solves it
    zero = torch.randint(0, 2 ** bits, (out_features, in_features // group), generator=g).float()
    codes = torch.randint(0, 2 ** bits, (out_features, in_features), generator=g).float()
    Q = (codes - zero.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)
    stored = gptq_codes(Q, scale, zero, bits, group)
    assert torch.equal(stored.codes.float(), codes)
    theirs = _gptqmodel_decode(Q, scale, zero, bits, group)
    assert torch.equal(stored.dequantize().half(), theirs)


def _held_out_error(fp_model, model, held_out):
    with torch.no_grad():
        y_fp = fp_model(input_ids=held_out, output_hidden_states=True).hidden_states[-1]
        y_q = model(input_ids=held_out, output_hidden_states=True).hidden_states[-1]
    return ((y_q - y_fp).norm() / y_fp.norm()).item()


def test_gptq_beats_rtn_on_held_out_windows():
    import copy

    from helpers.quant import options

    fp_model = structured_llama(layers=2, hidden=128)
    calib, held_out = windows(16, 32, seed=1), windows(4, 32, seed=2)
    gptq = quantize_model(fp_model, options("gptq", bits=3, group_size=32, lora_r=0, batch_size=4), calib,
                          log=lambda s: None)
    rtn = quantize_model(fp_model, options("rtn", bits=3, group_size=32), None, log=lambda s: None)
    assert gptq.weights.keys() == rtn.weights.keys() and gptq.lora == {} and gptq.lora_r == 0
    for w in gptq.weights.values():
        assert torch.equal(w.scales, w.scales.half().float()) and 0 <= w.zeros.min() and w.zeros.max() <= 7
    errors = {}
    for name, result in (("gptq", gptq), ("rtn", rtn)):
        model = copy.deepcopy(fp_model)
        apply_quantized_weights(model, result.weights)
        errors[name] = _held_out_error(fp_model, model, held_out)
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


def test_projections_sharing_an_input_are_solved_from_one_pass():
    from peftkit.models.families import family_of
    from peftkit.quant.block_inputs import capture_decoder_inputs
    from peftkit.quant.quantizers.gptq import subsets

    model = structured_llama(layers=1, hidden=64)
    hidden, kwargs = capture_decoder_inputs(model, model.model.layers, windows(2, 8))
    block = model.model.layers[0]
    linears = {path: block.get_submodule(path) for path in family_of(model).projections}
    assert subsets(block, linears, hidden, kwargs[0]) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
