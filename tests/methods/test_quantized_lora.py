"""QuantizedLoRA ("apiq"): loads the quantized base, trains only LoRA, saves/loads in peft format."""

from types import SimpleNamespace

import pytest
import torch
from helpers.quant import options, structured_llama, windows  # noqa: E402

from peftkit.errors import UserError  # noqa: E402
from peftkit.methods import create_method  # noqa: E402
from peftkit.quant.checkpoint import load_quantized, save_quantized  # noqa: E402
from peftkit.quant.pipeline import quantize_model  # noqa: E402


@pytest.fixture
def quant_dir(tmp_path):
    model = structured_llama()
    result = quantize_model(model, options("apiq-bw", bits=2, epochs=1, group_size=32), windows(4), log=lambda s: None)
    save_quantized(tmp_path / "q", model, result)
    return tmp_path / "q"


def _model_options(name):
    return SimpleNamespace(name=str(name), task_head="causal_lm")


def test_prepare_starts_from_the_calibrated_lora_and_freezes_the_base(quant_dir):
    method = create_method("apiq")
    model = method.prepare(method.load_base(_model_options(quant_dir), "causal_lm", None, None))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 7  # A and B of 7 projections in 2 blocks
    ids = windows(2, seed=3)
    reference = load_quantized(quant_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_training_step_changes_only_lora_and_save_load_round_trips(quant_dir, tmp_path):
    method = create_method("apiq")
    model = method.prepare(method.load_base(_model_options(quant_dir), "causal_lm", None, None))
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(method.param_groups(model, 0.0), lr=1e-2)
    ids = windows(2, seed=4)
    loss = method.compute_loss(model, {"input_ids": ids, "labels": ids})
    loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    method.save(model, tmp_path / "run")
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    fresh = method.load_base(_model_options(quant_dir), "causal_lm", None, None)
    loaded = method.load(fresh, tmp_path / "run")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
    restored = method.prepare(method.load_base(_model_options(quant_dir), "causal_lm", None, None))
    method.load_trainable_state(restored, method.trainable_state(model))
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_zero_init_and_a_plain_model_dir_is_refused(quant_dir, tmp_path):
    method = create_method("apiq", init="zero")
    model = method.prepare(method.load_base(_model_options(quant_dir), "causal_lm", None, None))
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "lora_B" in n)
    with pytest.raises(UserError, match="quantize` output directory"):
        method.load_base(_model_options(tmp_path), "causal_lm", None, None)
    with pytest.raises(UserError, match="method.dropout"):
        create_method("apiq", dropout=1.5)


def test_classification_head_trains_with_lora_on_a_packed_bfloat16_base(quant_dir):
    method = create_method("apiq")
    base = method.load_base(_model_options(quant_dir), "seq_cls", 2, "single_label_classification")
    model = method.prepare(base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and all("lora_" in n or "score" in n for n in trainable)
    ids = windows(2, seed=6)
    assert model(input_ids=ids, labels=torch.tensor([0, 1])).loss.isfinite()
    from peftkit.quant.packed_linear import PackedLinear

    bf16 = create_method("apiq")
    base = bf16.load_base(SimpleNamespace(name=str(quant_dir), dtype="bfloat16"), "causal_lm", None, None)
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    model = bf16.prepare(base)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, PackedLinear) and layer.lora_A["default"].weight.dtype == torch.float32
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert loss.isfinite() and layer.lora_B["default"].weight.grad is not None
