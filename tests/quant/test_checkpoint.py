"""`peftkit quantize` output: GPTQ-packed base + peft adapter that reload, packed, to the quantized model."""

import json

import pytest
import torch
from helpers.quant import (
    options,
    stored_reference,
    structured_llama,
    windows,
    write_model_dir,
    write_wikitext,
)

from peftkit.commands.quantize import quantize
from peftkit.quant.checkpoint import (
    load_quantized,
    load_quantized_base,
    load_quantized_weights,
    save_quantized,
)
from peftkit.quant.packed_linear import PackedLinear
from peftkit.quant.pipeline import quantize_model


@pytest.mark.parametrize("method,bits", [("apiq-bw", 2), ("rtn", 3), ("loftq", 3), ("nf", 4), ("rtn", None)])
def test_saved_model_reloads_packed_to_the_same_outputs(tmp_path, method, bits):
    model = structured_llama()
    result = quantize_model(model, options(method, bits=bits, epochs=1, group_size=32), windows(4), log=lambda s: None)
    for q in result.weights.values():
        if q.kind == "uniform":
            assert torch.equal(q.scales, q.scales.half().float())  # calibration keeps scales float16-exact
    save_quantized(tmp_path / "q", model, result)
    loaded = load_quantized(tmp_path / "q")
    ids = windows(2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, stored_reference(model, result)(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)
    layer = loaded.get_base_model().model.layers[0].mlp.down_proj.base_layer
    if bits is not None:
        assert isinstance(layer, PackedLinear) and layer.bits == bits
        groups = 64 * 128 // 32
        # codes at b bits, per group a scale and a zero point (at most 4 bytes each), the group index of each column
        assert layer.packed_bytes() <= 64 * 128 * bits // 8 + groups * 8 + 128 * 4
        # the stored codes are the quantizer's, bit for bit
        stored = load_quantized_weights(tmp_path / "q")["model.layers.0.mlp.down_proj"]
        assert torch.equal(stored.codes, result.weights["model.layers.0.mlp.down_proj"].codes)
    else:
        assert isinstance(layer, torch.nn.Linear)


def test_an_unquantized_output_written_when_bits_16_meant_not_quantized_still_loads(tmp_path):
    """quantization.json files written before ``bits`` could be null say 16 where they now say null."""
    model = structured_llama()
    result = quantize_model(model, options("rtn", bits=None, group_size=32), None, log=lambda s: None)
    save_quantized(tmp_path / "q", model, result)
    info_path = tmp_path / "q" / "quantization.json"
    info = json.loads(info_path.read_text())
    assert info["bits"] is None and {layer["bits"] for layer in info["layers"].values()} == {None}
    assert all(w.kind == "none" and w.bits is None for w in load_quantized_weights(tmp_path / "q").values())
    ids = windows(2, seed=5)
    with torch.no_grad():
        expected = load_quantized(tmp_path / "q")(input_ids=ids).logits
    info["bits"] = 16
    for layer in info["layers"].values():
        layer["bits"] = 16
    info_path.write_text(json.dumps(info))
    assert all(w.kind == "none" for w in load_quantized_weights(tmp_path / "q").values())
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "q")(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_uniform_outputs_declare_gptq_v2_nf4_bitsandbytes_and_nf3_nothing(tmp_path):
    model = structured_llama()
    for method, bits in (("rtn", 4), ("nf", 4), ("nf", 3)):
        result = quantize_model(model, options(method, bits=bits, group_size=32), None, log=lambda s: None)
        save_quantized(tmp_path / f"{method}{bits}", model, result, extra={"symmetric": False})
    config = json.loads((tmp_path / "rtn4" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["checkpoint_format"] == "gptq_v2"
    assert config["bits"] == 4 and config["group_size"] == 32 and config["sym"] is False and config["desc_act"] is False
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"] is True
    assert config["bnb_4bit_quant_type"] == "nf4" and config["bnb_4bit_use_double_quant"] is False
    assert config["llm_int8_skip_modules"] == ["lm_head"]  # the one Linear that stays 16-bit
    assert "quantization_config" not in json.loads((tmp_path / "nf3" / "config.json").read_text())
    storage = {d: json.loads((tmp_path / d / "quantization.json").read_text()) for d in ("rtn4", "nf4", "nf3")}
    assert [storage[d]["storage"] for d in ("rtn4", "nf4", "nf3")] == ["gptq", "bitsandbytes", "nf"]
    assert storage["nf3"]["loads_in"].startswith("peftkit only")
    for d in ("rtn4", "nf4"):
        adapter = json.loads((tmp_path / d / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str((tmp_path / d).resolve())


def test_quantize_command_writes_everything_and_reproduces_calibrated_outputs(tmp_path, capsys):
    model_dir = write_model_dir(tmp_path / "model")
    data = write_wikitext(tmp_path / "wikitext")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {model_dir}}}\nquant: {{method: apiq-lw, bits: 2, group_size: 16, lora_r: 4, epochs: 1}}\n"
                      f"calib: {{root: {data}, n_windows: 4, seq_len: 16}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    out = quantize(str(recipe), ["quant.lora_alpha=8"])
    printed = capsys.readouterr().out
    assert "block 1/2" in printed and "block 2/2" in printed
    for name in ("config.json", "model.safetensors", "quantization.json", "errors.json",
                 "adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).is_file(), name
    info = json.loads((out / "quantization.json").read_text())
    assert info["method"] == "apiq-lw" and info["bits"] == 2 and info["lora"] == {"r": 4, "alpha": 8.0, "targets": info["lora"]["targets"]}
    assert info["storage"] == "gptq" and 0 < info["packed_bytes"] < info["model_bytes"]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8.0

    # The reloaded model on the calibration windows reproduces the per-block error the quantizer measured
    # (up to the float16 storage of scales and of the unquantized tensors).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.utils.text_windows import random_windows, read_text, token_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = random_windows(token_ids(tok, read_text(data / "wiki.valid.tokens")), 4, 16, 0)
    fp = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    quantized = load_quantized(out).get_base_model()
    with torch.no_grad():
        y_fp = fp(input_ids=calib, output_hidden_states=True).hidden_states
        y_q = quantized(input_ids=calib, output_hidden_states=True).hidden_states
    errors = json.loads((out / "errors.json").read_text())
    for i, block in enumerate(errors["blocks"][:-1]):  # hidden_states[i + 1] = output of block i (last one is normed)
        measured = ((y_q[i + 1] - y_fp[i + 1]).norm() / y_fp[i + 1].norm()).item()
        assert measured == pytest.approx(block["rel_output_error"], rel=2e-2)


@pytest.mark.parametrize("method,bits", [("rtn", 2), ("nf", 4)])
def test_base_without_lora_and_with_a_classification_head(tmp_path, method, bits):
    model = structured_llama()
    result = quantize_model(model, options(method, bits=bits, group_size=32), None, log=lambda s: None)
    save_quantized(tmp_path / "q", model, result)
    base = load_quantized_base(tmp_path / "q")
    w = base.model.layers[1].self_attn.o_proj.unpack()
    expected = result.weights["model.layers.1.self_attn.o_proj"].dequantize()
    # GPTQ: the float16 product GPTQ kernels compute; NF4 (bitsandbytes layout): levels x float32 absmax, exactly
    assert torch.equal(w, expected.half().float() if method == "rtn" else expected)
    cls = load_quantized_base(tmp_path / "q", task_head="seq_cls", num_labels=3)
    assert cls.score.out_features == 3 and torch.equal(cls.model.layers[1].self_attn.o_proj.unpack(), w)
    assert not cls.score.weight.is_meta and cls.score.weight.abs().sum() > 0
    assert not any(t.is_meta for t in [*cls.parameters(), *cls.buffers()])
