"""peft's Super-Tuning wrapped as a PaFi peer: smallest |w| per matrix, frozen entries bit-identical after AdamW
with weight decay, save -> load -> same logits, merged == unmerged with the base architecture."""

import copy

import pytest
import torch
from helpers.tiny import assert_base_architecture, tiny_bert

from peftkit.errors import UserError
from peftkit.methods import create_method
from peftkit.methods.base import is_head_parameter
from peftkit.methods.supertuning import SuperTuning, SuperTuningOptions

METHOD = create_method("supertuning")
BATCH = {"input_ids": torch.tensor([[2, 7, 9, 11, 3, 0], [2, 5, 6, 8, 12, 3]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]),
         "labels": torch.tensor([0, 1])}


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"]).logits


def supports(model) -> dict:
    """base weight name -> the flat indices peft trains."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "supertuning_indices"):
            plain = name.removeprefix("base_model.model.")
            out[f"{plain}.weight"] = module.supertuning_indices["default"].long()
    return out


def train_steps(model, steps=4):
    model.train()
    opt = torch.optim.AdamW(METHOD.param_groups(model, 0.5), lr=5e-2)
    for _ in range(steps):
        METHOD.compute_loss(model, BATCH).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("select", ["smallest", "largest"])
def test_selects_the_extreme_magnitudes_of_every_projection(select):
    base = tiny_bert()
    model = SuperTuning(SuperTuningOptions(rho=0.05, select=select)).prepare(copy.deepcopy(base))
    chosen = supports(model)
    assert len(chosen) == 2 * 6  # q, k, v, attention out, FFN in, FFN out per layer
    for name, idx in chosen.items():
        w = base.get_parameter(name).detach().abs().reshape(-1)
        assert abs(idx.numel() - 0.05 * w.numel()) <= 1
        order = torch.sort(w, descending=select == "largest").indices[: idx.numel()]
        assert set(order.tolist()) == set(idx.tolist()), name


def test_outside_the_support_bit_identical_after_adamw_with_weight_decay():
    base = tiny_bert()
    model = SuperTuning(SuperTuningOptions(rho=0.05)).prepare(copy.deepcopy(base))
    chosen = supports(model)
    train_steps(model)
    merged = METHOD.merge(model)
    moved = 0
    for name, before in base.state_dict().items():
        if is_head_parameter(name):
            continue
        after = merged.state_dict()[name]
        inside = torch.zeros(before.numel(), dtype=torch.bool)
        if name in chosen:
            inside[chosen[name]] = True
        assert torch.equal(after.reshape(-1)[~inside], before.reshape(-1)[~inside]), name
        moved += int((after.reshape(-1)[inside] != before.reshape(-1)[inside]).sum())
    assert moved > 0.9 * sum(i.numel() for i in chosen.values())


def test_save_load_and_merge_reproduce_logits(tmp_path):
    base = tiny_bert()
    opts = SuperTuningOptions(rho=0.05)
    model = SuperTuning(opts).prepare(copy.deepcopy(base))
    train_steps(model)
    trained = logits(model)
    SuperTuning(opts).save(model, tmp_path)
    fresh = tiny_bert()
    torch.nn.init.normal_(fresh.classifier.weight)
    assert torch.equal(logits(SuperTuning(opts).load(fresh, tmp_path)), trained)
    merged = METHOD.merge(model)
    assert torch.equal(logits(merged), trained)
    assert_base_architecture(merged, base)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())


def test_options_validate():
    assert create_method("supertuning").options == SuperTuningOptions()
    with pytest.raises(UserError, match="method.rho: must be > 0 and < 1, got 1.0"):
        create_method("supertuning", rho=1.0)
