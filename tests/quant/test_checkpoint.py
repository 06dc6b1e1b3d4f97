"""`peftkit quantize` output: packed low-bit base + peft adapter that reload to the calibrated model."""

import json

import pytest
import torch
from helpers.quant import (
    options,
    structured_llama,
    windows,
    write_model_dir,
    write_wikitext,
)

from peftkit.commands.quantize import quantize
from peftkit.quant.checkpoint import load_quantized, load_quantized_base, save_quantized
from peftkit.quant.pipeline import quantize_model


@pytest.mark.parametrize("method,bits", [("apiq-bw", 2), ("loftq", 3), ("nf", 4), ("rtn", 16)])
def test_saved_model_reloads_to_the_same_outputs(tmp_path, method, bits):
    model = structured_llama()
    calib = windows(4)
    result = quantize_model(model, options(method, bits=bits, epochs=1, group_size=32), calib, log=lambda s: None)
    in_memory = save_quantized(tmp_path / "q", model, result)
    loaded = load_quantized(tmp_path / "q")
    ids = windows(2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, in_memory(input_ids=ids).logits, rtol=0, atol=1e-5)
    # the stored codes really are low-bit
    if bits < 16:
        from safetensors.torch import load_file

        tensors = load_file(str(tmp_path / "q" / "quantized_base.safetensors"))
        name = "model.layers.0.mlp.down_proj"
        assert tensors[f"{name}.qcodes"].dtype == torch.uint8
        assert tensors[f"{name}.qcodes"].numel() == 64 * 128 * bits // 8
        assert f"{name}.weight" not in tensors


def test_quantize_command_writes_everything_and_reproduces_calibrated_outputs(tmp_path, capsys):
    model_dir = write_model_dir(tmp_path / "model")
    data = write_wikitext(tmp_path / "wikitext")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {model_dir}}}\nquant: {{method: apiq-lw, bits: 2, group_size: 16, lora_r: 4, epochs: 1}}\n"
                      f"calib: {{root: {data}, n_windows: 4, seq_len: 16}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    out = quantize(str(recipe), ["quant.lora_alpha=8"])
    printed = capsys.readouterr().out
    assert "block 1/2" in printed and "block 2/2" in printed
    for name in ("config.json", "quantized_base.safetensors", "quantization.json", "errors.json",
                 "adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).is_file(), name
    info = json.loads((out / "quantization.json").read_text())
    assert info["method"] == "apiq-lw" and info["bits"] == 2 and info["lora"] == {"r": 4, "alpha": 8.0, "targets": info["lora"]["targets"]}
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8.0

    # Reloaded model on the calibration windows reproduces the per-block error the quantizer measured.
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
        assert measured == pytest.approx(block["rel_output_error"], rel=1e-4)


def test_base_without_lora_and_with_a_classification_head(tmp_path):
    model = structured_llama()
    result = quantize_model(model, options("rtn", group_size=32), None, log=lambda s: None)
    save_quantized(tmp_path / "q", model, result)
    base = load_quantized_base(tmp_path / "q")
    w = base.model.layers[1].self_attn.o_proj.weight
    assert torch.equal(w, result.weights["model.layers.1.self_attn.o_proj"].dequantize())
    cls = load_quantized_base(tmp_path / "q", task_head="seq_cls", num_labels=3)
    assert cls.score.out_features == 3 and torch.equal(cls.model.layers[1].self_attn.o_proj.weight, w)
