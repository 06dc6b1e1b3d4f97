"""full / lora / bitfit: what trains, save -> load gives the same logits, LoRA merged == unmerged."""

import pytest
import torch
from helpers.tiny import tiny_bert

from peftkit.methods import create_method


def _batch():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(5, 60, (3, 7), generator=g), "attention_mask": torch.ones(3, 7, dtype=torch.long)}


def _train_a_bit(model, method, steps=3):
    opt = torch.optim.AdamW(method.param_groups(model, 0.01), lr=1e-2)
    batch = {**_batch(), "labels": torch.tensor([0, 1, 1])}
    model.train()
    for _ in range(steps):
        method.compute_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_bitfit_trains_only_biases_and_head():
    method = create_method("bitfit")
    model = method.prepare(tiny_bert())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".bias") or n.startswith("classifier.") or ".pooler." in n for n in trainable)
    assert "classifier.weight" in trainable and "bert.pooler.dense.weight" in trainable


def test_lora_trains_adapters_and_head_only():
    method = create_method("lora")
    model = create_method(method.name, r=4).prepare(tiny_bert())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "classifier" in n or "pooler" in n for n in trainable)
    assert any("classifier" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert any("pooler" in n for n in trainable)  # BERT's pooler belongs to the classification head


@pytest.mark.parametrize("name", ["lora", "bitfit", "full"])
def test_save_then_load_reproduces_logits(tmp_path, name):
    method = create_method(name)
    options = method.Options()
    model = _train_a_bit(type(method)(options).prepare(tiny_bert(seed=0)), method)
    expected = model(**_batch()).logits
    type(method)(options).save(model, tmp_path)
    fresh = tiny_bert(seed=0)  # the same pretrained base ...
    torch.nn.init.normal_(fresh.classifier.weight)  # ... with a new, different task head
    reloaded = type(method)(options).load(fresh, tmp_path).eval()
    torch.testing.assert_close(reloaded(**_batch()).logits, expected, rtol=0, atol=1e-6)


def test_lora_merged_equals_unmerged():
    method = create_method("lora")
    model = _train_a_bit(create_method(method.name, r=4).prepare(tiny_bert()), method)
    expected = model(**_batch()).logits
    merged = method.merge(model)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert type(merged).__name__ == "BertForSequenceClassification"
    torch.testing.assert_close(merged(**_batch()).logits, expected, rtol=1e-5, atol=1e-5)


def test_no_weight_decay_on_bias_and_layernorm():
    method = create_method("full")
    model = method.prepare(tiny_bert())
    groups = method.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = [names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert no_decay and all(n.endswith("bias") or "LayerNorm" in n for n in no_decay)


def test_unknown_and_unbuilt_methods_explain_themselves():
    from peftkit.errors import UserError

    with pytest.raises(UserError, match='did you mean "lora"'):
        create_method("loar")
