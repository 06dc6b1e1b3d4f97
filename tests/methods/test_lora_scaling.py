"""LoRA's update is (alpha / r) * B A x exactly: for the lora method (peft on a float base), for QuantLinear (what
calibration trains), for the LoRA a quantizer initialises (LoftQ) and for the peft model built from its result."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.quant import options, structured_llama
from torch import nn

from peftkit.methods import create_method
from peftkit.quant.qlinear import QuantLinear

R, ALPHA = 4, 12.0  # alpha / r = 3, neither 1 nor alpha nor r


def _random_(tensor: torch.Tensor, seed: int) -> None:
    with torch.no_grad():
        tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed)))


def _peft_delta_matches(module, x: torch.Tensor, scaling: float) -> None:
    """module (a peft LoRA layer): module(x) - base(x) == scaling * x A^T B^T."""
    A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
    with torch.no_grad():
        delta = module(x) - module.base_layer(x)
        expected = scaling * (x @ A.T @ B.T)
    assert expected.abs().max() > 1e-2  # B is not zero: the update is there to be scaled
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-5)


def test_lora_method_update_is_alpha_over_r_times_BAx():
    from helpers.tiny import tiny_bert

    model = create_method("lora", r=R, alpha=ALPHA).prepare(tiny_bert()).eval()
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]
    assert layers
    for i, module in enumerate(layers[:3]):
        _random_(module.lora_B["default"].weight, seed=10 + i)
        _peft_delta_matches(module, torch.randn(2, 5, module.in_features, generator=torch.Generator().manual_seed(i)),
                            ALPHA / R)


def test_quant_linear_update_is_scaling_times_BAx():
    torch.manual_seed(0)
    q = QuantLinear(nn.Linear(32, 16), bits=2, group_size=16, r=R, scaling=ALPHA / R)
    _random_(q.lora_B, seed=3)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        delta = q(x) - F.linear(x, q.quantized_weight(), q.bias)
        expected = (ALPHA / R) * (x @ q.lora_A.T @ q.lora_B.T)
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6)


def test_quantizer_lora_is_built_with_alpha_over_r():
    """LoftQ's B A is the rank-r SVD of W - Q divided by alpha / r; the peft model built from the result
    multiplies it back by alpha / r."""
    from peftkit.quant.pipeline import build_quantized_model, quantize_model

    model = structured_llama()
    opts = options("loftq", bits=2, lora_r=R, lora_alpha=ALPHA, loftq_iters=1)
    result = quantize_model(model, opts, None, log=lambda s: None)
    assert result.lora
    for name, (A, B) in list(result.lora.items())[:3]:
        W = model.get_submodule(name).weight.detach()
        residual = W - result.weights[name].dequantize()
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
        best = U[:, :R] @ torch.diag(S[:R]) @ Vh[:R]
        torch.testing.assert_close((ALPHA / R) * (B @ A), best, rtol=1e-3, atol=1e-5)

    built = build_quantized_model(copy.deepcopy(model), result).eval()
    name = next(iter(result.lora))
    module = built.base_model.model.get_submodule(name)
    _peft_delta_matches(module, torch.randn(2, 5, module.in_features, generator=torch.Generator().manual_seed(5)),
                        ALPHA / R)


@pytest.mark.parametrize("r,alpha", [(2, 16.0), (8, 4.0)])
def test_quant_linear_scaling_is_what_the_pipeline_passes(r, alpha, monkeypatch):
    """quantize_model hands every QuantLinear s = alpha / r."""
    from peftkit.quant import pipeline

    seen = []
    original = pipeline.QuantLinear

    def spy(*args, **kwargs):
        q = original(*args, **kwargs)
        seen.append((q.r, q.scaling))
        return q

    monkeypatch.setattr(pipeline, "QuantLinear", spy)
    pipeline.quantize_model(structured_llama(layers=1), options("rtn", lora_r=r, lora_alpha=alpha), None,
                            log=lambda s: None)
    assert seen and all(s == pytest.approx(alpha / r) for _, s in seen)


def test_quantized_lora_merge_folds_alpha_over_r_times_BA_into_the_weight(tmp_path):
    """The apiq method's merge: each unpacked weight plus (alpha / r) * B A, so the merged model computes what the
    LoRA model computed."""
    from types import SimpleNamespace

    from helpers.quant import windows

    from peftkit.quant.checkpoint import save_quantized
    from peftkit.quant.pipeline import quantize_model

    model = structured_llama()
    result = quantize_model(model, options("rtn", bits=4, lora_r=R, lora_alpha=ALPHA), None, log=lambda s: None)
    save_quantized(tmp_path / "q", model, result)
    method = create_method("apiq")
    peft_model = method.prepare(method.load_base(SimpleNamespace(name=str(tmp_path / "q"), task_head="causal_lm"),
                                                 "causal_lm", None, None)).eval()
    layers = [m for m in peft_model.modules() if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {})]
    for i, module in enumerate(layers):
        _random_(module.lora_B["default"].weight, seed=20 + i)
        with torch.no_grad():
            module.lora_B["default"].weight.mul_(0.05)
    module = layers[0]
    _peft_delta_matches(module, torch.randn(2, 5, module.in_features, generator=torch.Generator().manual_seed(6)), ALPHA / R)
    ids = windows(2, seed=3)
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        merged = method.merge(peft_model).eval()(input_ids=ids).logits
    assert (unmerged - model(input_ids=ids).logits).abs().max() > 1e-2  # the LoRA update changes the logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
