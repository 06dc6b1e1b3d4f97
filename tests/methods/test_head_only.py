"""The head-only control and HiWi-bias on models with nothing to adapt: head-only trains exactly the task head
(classifier and BERT's pooler, names listed independently of peftkit's head rule) and nothing else moves; HiWi-bias
warns once, naming the model and the number of biases, when every FFN bias is zero (then it trains only the head, as
head-only does), and refuses a model whose FFN layers have no bias at all."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers.tiny import tiny_bert, tiny_bert_config

from peftkit.errors import UserError
from peftkit.methods import create_method
from peftkit.methods.hiwi import HiWi, HiWiOptions, adapted_tensors

ROOT = Path(__file__).resolve().parents[2]
HEAD = {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
BATCH = {"input_ids": torch.tensor([[2, 7, 9, 11, 3, 0], [2, 5, 6, 8, 12, 3]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]), "labels": torch.tensor([0, 1])}


def train(method, model, steps=3, lr=5e-2):
    opt = torch.optim.AdamW(method.param_groups(model, 0.1), lr=lr)
    model.train()
    for _ in range(steps):
        method.compute_loss(model, BATCH).backward()
        opt.step()
        opt.zero_grad()
    return model


def moved(before, after) -> set[str]:
    """Names of the parameters whose values changed (parametrized tensors by their plain name)."""
    a = dict(before.named_parameters())
    changed = set()
    for name, p in after.named_parameters():
        plain = name.replace("parametrizations.", "").replace(".original", "")
        if plain in a and not torch.equal(a[plain], p.detach()):
            changed.add(plain)
    for name, _ in adapted_tensors(after).items():  # the adapted value P', not only the frozen original
        module, attr = name.rsplit(".", 1)
        if not torch.equal(getattr(after.get_submodule(module), attr), a[name]):
            changed.add(name)
    return changed


def test_head_only_trains_exactly_the_head_and_nothing_else_moves():
    base = tiny_bert()
    method = create_method("head-only")
    model = method.prepare(copy.deepcopy(base))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == HEAD
    train(method, model)
    assert moved(base, model) == HEAD
    assert set(method.trainable_state(model)) == HEAD


def test_head_only_save_load_and_merge_reproduce_the_logits(tmp_path):
    method = create_method("head-only")
    model = train(method, method.prepare(tiny_bert())).eval()
    with torch.no_grad():
        expected = model(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"]).logits
    method.save(model, tmp_path)
    reloaded = create_method("head-only").load(tiny_bert(), tmp_path).eval()
    merged = method.merge(reloaded)
    with torch.no_grad():
        assert torch.equal(merged(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"]).logits, expected)


def test_head_only_refuses_a_model_without_a_head():
    from helpers.tiny import tiny_llama

    with pytest.raises(UserError, match="no task head"):
        create_method("head-only").prepare(tiny_llama())


def test_hiwi_bias_on_zero_biases_warns_once_and_trains_only_the_head():
    base = tiny_bert()  # from_config: every bias is zero, as in any randomly initialised model
    assert all(not p.any() for n, p in base.named_parameters() if n.endswith(".bias"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = HiWi(HiWiOptions(target="bias", r=4)).prepare(copy.deepcopy(base))
    hiwi = [w for w in caught if "HiWi" in str(w.message)]
    assert len(hiwi) == 1, [str(w.message) for w in caught]
    text = str(hiwi[0].message)
    assert "bert model" in text and "all 4 FFN biases are zero" in text and "only the task head" in text
    train(HiWi(HiWiOptions(target="bias", r=4)), model)
    assert moved(base, model) == HEAD  # what head-only trains: the adapters never move a zero bias


def test_hiwi_bias_with_pretrained_like_biases_does_not_warn_and_moves_them():
    base = tiny_bert()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = HiWi(HiWiOptions(target="bias", r=4)).prepare(copy.deepcopy(base))
    train(HiWi(HiWiOptions(target="bias", r=4)), model)
    ffn = {f"bert.encoder.layer.{i}.{m}.bias" for i in (0, 1) for m in ("intermediate.dense", "output.dense")}
    assert moved(base, model) == HEAD | ffn


def test_hiwi_bias_with_some_zero_biases_warns_how_many_stay():
    base = tiny_bert()
    with torch.no_grad():
        base.bert.encoder.layer[0].intermediate.dense.bias.normal_(std=0.1)
    with pytest.warns(UserWarning, match="3 of the 4 FFN biases are zero"):
        HiWi(HiWiOptions(target="bias", r=4)).prepare(base)


def test_hiwi_bias_refuses_a_bias_free_bert():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_bert_config())
    for layer in model.bert.encoder.layer:  # a BERT whose FFN projections were built with bias=False
        layer.intermediate.dense.bias = None
        layer.output.dense.bias = None
    with pytest.raises(UserError, match="the 4 FFN projections of the bert model .* have no bias"):
        HiWi(HiWiOptions(target="bias")).prepare(model)


def test_cli_refuses_hiwi_bias_without_biases_in_one_paragraph(tmp_path):
    """`peftkit finetune` with HiWi-bias on a LLaMA classifier (its FFN projections have no bias): exit 2, one
    paragraph, no traceback, and no run directory left behind."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from helpers.tiny import tiny_bert_tokenizer, write_glue_task

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  num_labels=2, pad_token_id=0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(model_dir)
    tiny_bert_tokenizer(model_dir)
    root = write_glue_task(tmp_path / "glue")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "peftkit", "finetune", "hiwi-bias-minilm-sst2",
                           f"model.name={model_dir}", f"data.root={root}", "train.max_steps=1",
                           f"output.dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr and len(message) == 1
    # refused from config.json, before any data is read: the family lacks what hiwi's bias target needs
    assert "method hiwi does not support llama models: its FFN projections have no bias terms" in message[0]
    assert not out.exists()
