"""A `peftkit quantize` output loads outside peftkit: transformers' GPTQ integration (GPTQModel) builds the same
quantized model, and peft's AutoPeftModel the same model with its LoRA."""

import pytest
import torch
from helpers.quant import write_model_dir, write_wikitext

from peftkit.commands.quantize import quantize
from peftkit.quant.checkpoint import load_quantized


@pytest.fixture(scope="module")
def quantize_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    model_dir = write_model_dir(root / "model")
    data = write_wikitext(root / "wikitext")
    recipe = root / "r.yaml"
    recipe.write_text(f"model: {{name: {model_dir}}}\nquant: {{method: apiq-bw, bits: 3, group_size: 32, lora_r: 4, epochs: 1}}\n"
                      f"calib: {{root: {data}, n_windows: 4, seq_len: 16}}\noutput: {{dir: {root / 'out'}}}\n")
    return quantize(str(recipe))


def test_auto_peft_model_gives_peftkits_logits(quantize_output):
    from peft import AutoPeftModelForCausalLM

    ids = torch.randint(5, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = load_quantized(quantize_output)
    theirs = AutoPeftModelForCausalLM.from_pretrained(str(quantize_output), dtype=torch.float32, device_map="cpu").eval()
    layer = theirs.get_base_model().model.layers[0].mlp.down_proj.base_layer
    assert "gptqmodel" in type(layer).__module__  # GPTQModel's layer, not ours
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-6)
        with ours.disable_adapter():  # the calibrated LoRA does act
            assert not torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_auto_model_gives_peftkits_base_and_lora(quantize_output):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(5, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = load_quantized(quantize_output)
    theirs = AutoModelForCausalLM.from_pretrained(quantize_output, dtype=torch.float32, device_map="cpu").eval()
    with torch.no_grad():
        with_lora = theirs(input_ids=ids).logits
        # transformers loads the adapter in float16 (the checkpoint's dtype): equal up to that rounding
        torch.testing.assert_close(with_lora, ours(input_ids=ids).logits, rtol=0, atol=2e-3)
        theirs.disable_adapters()
        with ours.disable_adapter():
            torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_an_output_written_to_a_relative_directory_loads_from_anywhere(tmp_path, monkeypatch):
    """The adapter names its base by absolute path: written from one directory, AutoPeftModel loads it from another."""
    import json

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.quant import options
    from peftkit.quant.checkpoint import save_quantized
    from peftkit.quant.pipeline import quantize_model

    model_dir = write_model_dir(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    result = quantize_model(model, options("rtn", bits=4, group_size=16), None, log=lambda s: None)
    monkeypatch.chdir(tmp_path)
    save_quantized(__import__("pathlib").Path("out"), model, result, AutoTokenizer.from_pretrained(model_dir))
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (tmp_path / "out").resolve())
    monkeypatch.chdir(tmp_path / "model")
    AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32, device_map="cpu")
