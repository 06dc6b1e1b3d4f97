"""Quantizing from disk one block at a time (a model skeleton whose blocks are read from safetensors) gives the
same codes, scales, zeros and LoRA as quantizing the loaded model, and never holds two blocks' weights."""

import pytest
import torch
import yaml
from helpers.quant import options, structured_llama, windows, write_model_dir, write_wikitext

from peftkit.quant import pipeline
from peftkit.quant.blocks import load_skeleton
from peftkit.quant.pipeline import quantize_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    structured_llama(layers=3).save_pretrained(directory)
    return directory


def _same(a, b):
    assert a.weights.keys() == b.weights.keys() and a.lora.keys() == b.lora.keys()
    for name, w in a.weights.items():
        v = b.weights[name]
        for part in ("codes", "scales", "zeros", "weight"):
            x, y = getattr(w, part), getattr(v, part)
            assert (x is None and y is None) or torch.equal(x, y), (name, part)
    for name, (A, B) in a.lora.items():
        assert torch.equal(A, b.lora[name][0]) and torch.equal(B, b.lora[name][1]), name
    assert [x.get("rel_output_error") for x in a.blocks] == [x.get("rel_output_error") for x in b.blocks]


@pytest.mark.parametrize("method", ["apiq-bw", "apiq-lw", "loftq", "rtn"])
def test_disk_path_equals_the_in_memory_path(model_dir, method, monkeypatch):
    from transformers import AutoModelForCausalLM

    opts = options(method, epochs=1)
    loaded = quantize_model(AutoModelForCausalLM.from_pretrained(model_dir), opts, windows(), log=lambda s: None)

    skeleton, weights = load_skeleton(model_dir)
    blocks = list(skeleton.model.layers)
    real_blocks = []
    load = pipeline._DiskBlocks.load

    def counting_load(self, i):
        block = load(self, i)
        real_blocks.append(sum(not b.self_attn.q_proj.weight.is_meta for b in blocks))
        return block

    monkeypatch.setattr(pipeline._DiskBlocks, "load", counting_load)
    streamed = quantize_model(skeleton, opts, windows(), log=lambda s: None, weights=weights)
    _same(loaded, streamed)
    assert real_blocks == [1, 1, 1]  # each block is loaded alone
    assert all(p.is_meta for b in blocks for p in b.mlp.parameters())  # and handed back when done


def test_tied_embeddings_and_rotary_buffers_of_the_skeleton(model_dir):
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(model_dir)
    skeleton, _ = load_skeleton(model_dir)
    assert torch.equal(skeleton.model.embed_tokens.weight, full.model.embed_tokens.weight)
    assert torch.equal(skeleton.lm_head.weight, full.lm_head.weight)
    assert torch.equal(skeleton.model.rotary_emb.inv_freq, full.model.rotary_emb.inv_freq)
    assert all(p.is_meta for p in skeleton.model.layers.parameters())


def test_quantize_command_writes_what_the_in_memory_path_writes(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.commands.quantize import quantize
    from peftkit.quant.checkpoint import save_quantized
    from peftkit.utils.text_windows import random_windows, read_text, token_ids

    model_dir = write_model_dir(tmp_path / "model", layers=3)
    data = write_wikitext(tmp_path / "wikitext")
    quant = {"method": "apiq-bw", "bits": 2, "group_size": 16, "lora_r": 4, "epochs": 1, "batch_size": 2}
    raw = {"kind": "quantize", "model": {"name": str(model_dir)}, "calib": {"root": str(data), "n_windows": 4, "seq_len": 16},
           "quant": quant, "output": {"dir": str(tmp_path / "q")}}
    (tmp_path / "quant.yaml").write_text(yaml.safe_dump(raw))
    out = quantize(str(tmp_path / "quant.yaml"))

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = random_windows(token_ids(tokenizer, read_text(data / "wiki.valid.tokens")), 4, 16, 0)
    opts = options(**{**quant, "lora_alpha": 16.0, "lr_lora": 5e-3, "lr_clip": 5e-2})
    result = quantize_model(model, opts, calib, log=lambda s: None)
    save_quantized(tmp_path / "ref", model, result, tokenizer)
    for name in ("model.safetensors", "adapter_model.safetensors"):
        ours, ref = load_file(out / name), load_file(tmp_path / "ref" / name)
        assert ours.keys() == ref.keys(), name
        for key in ref:
            assert torch.equal(ours[key], ref[key]), (name, key)
