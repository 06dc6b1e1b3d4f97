"""HiWi invariants (docs/methods/pafi-hiwi.md): at init == base, it trains (gradients reach W_down and W_up), the
forward uses P + ReLU(P·W_down)·W_up, merged == unmerged with the base architecture, only FFN parameters
change, and the bias variant saves only the new biases (and the head)."""

import copy

import pytest
import torch
from helpers.tiny import assert_base_architecture, tiny_bert, tiny_llama

from peftkit.errors import UserError
from peftkit.methods import create_method
from peftkit.methods.base import is_head_parameter
from peftkit.methods.hiwi import HiWi, HiWiOptions, adapted_tensors

METHOD = create_method("hiwi")
BATCH = {"input_ids": torch.tensor([[2, 7, 9, 11, 3, 0], [2, 5, 6, 8, 12, 3]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]),
         "labels": torch.tensor([0, 1])}
FFN = [f"bert.encoder.layer.{i}.{m}" for i in (0, 1) for m in ("intermediate.dense", "output.dense")]


def pretrained_like(**kw):
    """A tiny BERT whose biases are non-zero, as pretrained ones are (from_config zero-initialises them,
    and HiWi cannot move an all-zero parameter: f(0) = ReLU(0·W_down)·W_up = 0)."""
    model = tiny_bert(**kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
    return model


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"]).logits


def train_steps(model, steps=4, lr=5e-2, weight_decay=0.1):
    model.train()
    opt = torch.optim.AdamW(METHOD.param_groups(model, weight_decay), lr=lr)
    for _ in range(steps):
        METHOD.compute_loss(model, BATCH).backward()
        opt.step()
        opt.zero_grad()
        METHOD.after_optimizer_step(model)


@pytest.mark.parametrize("target", ["weight", "bias"])
def test_at_init_outputs_equal_the_base(target):
    base = pretrained_like()
    model = HiWi(HiWiOptions(target=target, r=4)).prepare(copy.deepcopy(base))
    assert set(adapted_tensors(model)) == {f"{m}.{target}" for m in FFN}
    assert torch.equal(logits(model), logits(base))


def test_at_init_equal_on_a_decoder_and_bias_target_needs_biases():
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 7))
    model = HiWi(HiWiOptions(target="weight")).prepare(copy.deepcopy(base))
    assert len(adapted_tensors(model)) == 2 * 3  # gate, up, down per layer
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    with pytest.raises(UserError, match="no bias"):
        HiWi(HiWiOptions(target="bias")).prepare(copy.deepcopy(base))


@pytest.mark.parametrize("target", ["weight", "bias"])
def test_trains_only_adapters_and_head_and_gradients_reach_both_projections(target):
    model = HiWi(HiWiOptions(target=target, r=4)).prepare(pretrained_like())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"} | {
        f"{m}.parametrizations.{target}.0.{w}" for m in FFN for w in ("down", "up")}
    adapters = list(adapted_tensors(model).values())
    model.train()
    opt = torch.optim.AdamW(METHOD.param_groups(model, 0.0), lr=1e-2)
    METHOD.compute_loss(model, BATCH).backward()
    # W_up = 0 at init: W_up receives gradient at once, W_down only once W_up has moved.
    assert all(a.up.grad is not None and a.up.grad.abs().sum() > 0 for a in adapters)
    opt.step()
    opt.zero_grad()
    METHOD.compute_loss(model, BATCH).backward()
    assert all(a.down.grad is not None and a.down.grad.abs().sum() > 0 for a in adapters)
    assert all(a.up.abs().sum() > 0 for a in adapters)


def test_forward_uses_p_plus_relu_p_down_up():
    base = pretrained_like()
    model = HiWi(HiWiOptions(target="weight", r=3)).prepare(copy.deepcopy(base))
    with torch.no_grad():
        for a in adapted_tensors(model).values():
            a.up.normal_()
    for name, adapter in adapted_tensors(model).items():
        module_name, attr = name.rsplit(".", 1)
        p = base.get_submodule(module_name).get_parameter(attr).detach()
        expected = p + torch.clamp(p @ adapter.down, min=0) @ adapter.up  # rows of the (out, in) matrix
        assert torch.allclose(getattr(model.get_submodule(module_name), attr), expected, atol=1e-6)
    bias_model = HiWi(HiWiOptions(target="bias", r=3)).prepare(copy.deepcopy(base))
    adapter = adapted_tensors(bias_model)["bert.encoder.layer.0.intermediate.dense.bias"]
    with torch.no_grad():
        adapter.up.normal_()
    b = base.bert.encoder.layer[0].intermediate.dense.bias.detach()
    assert adapter.down.shape == (64, 3) and adapter.up.shape == (3, 64)
    expected = b + (torch.clamp(b[None] @ adapter.down, min=0) @ adapter.up)[0]
    assert torch.allclose(bias_model.bert.encoder.layer[0].intermediate.dense.bias, expected, atol=1e-6)


@pytest.mark.parametrize("target", ["weight", "bias"])
def test_merged_equals_unmerged_base_architecture_and_only_ffn_changes(target):
    base = pretrained_like()
    model = HiWi(HiWiOptions(target=target, r=4)).prepare(copy.deepcopy(base))
    train_steps(model)
    unmerged = logits(model)
    merged = METHOD.merge(model)
    assert torch.equal(logits(merged), unmerged)
    assert_base_architecture(merged, base)
    adapted = {f"{m}.{target}" for m in FFN}
    for name, before in base.state_dict().items():
        after = merged.state_dict()[name]
        if name in adapted or is_head_parameter(name):
            assert not torch.equal(after, before), name
        else:
            assert torch.equal(after, before), name


@pytest.mark.parametrize("target", ["weight", "bias"])
def test_save_load_reproduces_logits(tmp_path, target):
    opts = HiWiOptions(target=target, r=4)
    model = HiWi(opts).prepare(pretrained_like())
    train_steps(model)
    trained = logits(model)

    resumed = HiWi(opts).prepare(pretrained_like())
    METHOD.load_trainable_state(resumed, METHOD.trainable_state(model))
    assert torch.equal(logits(resumed), trained)

    HiWi(opts).save(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter.safetensors"))
    head = {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    if target == "bias":  # the paper's storage claim: the new FFN biases are all that is kept
        assert set(saved) == head | {f"{m}.bias" for m in FFN}
    else:
        assert set(saved) == head | {f"{m}.parametrizations.weight.0.{w}" for m in FFN for w in ("down", "up")}
    fresh = pretrained_like()
    torch.nn.init.normal_(fresh.classifier.weight)
    loaded = HiWi(opts).load(fresh, tmp_path)
    assert torch.equal(logits(loaded), trained)
    assert torch.equal(logits(METHOD.merge(loaded)), trained)


def test_options_validate():
    assert create_method("hiwi").options == HiWiOptions()
    with pytest.raises(UserError, match="method.r: must be >= 1 and <= 65536, got 0"):
        create_method("hiwi", r=0)
