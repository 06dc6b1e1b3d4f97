"""NF4 `peftkit quantize` outputs are bitsandbytes 4-bit checkpoints: transformers (with bitsandbytes) and peft's
AutoPeftModel load them as the same quantized model with the same LoRA; NF2/NF3 outputs stay peftkit-only."""

import json

import pytest
import torch
from helpers.quant import options, structured_llama, write_model_dir, write_wikitext

from peftkit.commands.quantize import quantize
from peftkit.quant import bnb_format, checkpoint
from peftkit.quant.checkpoint import (
    load_quantized,
    load_quantized_weights,
    save_quantized,
)
from peftkit.quant.normal_float import nf_dequantize, nf_quantize
from peftkit.quant.packed_linear import PackedLinear
from peftkit.quant.pipeline import quantize_model


def _random_nf4(out=8, inp=128, group=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inp), generator=g).to(torch.uint8)
    absmax = torch.rand(out, inp // group, generator=g) + 0.01
    return codes, absmax


def test_codes_and_absmax_round_trip_bit_exact_through_the_bitsandbytes_tensors():
    codes, absmax = _random_nf4()
    parts = bnb_format.to_bnb(codes, absmax, 32)
    assert parts["weight"].dtype == torch.uint8 and parts["weight"].shape == (8 * 128 // 2, 1)
    assert parts["weight.absmax"].dtype == torch.float32 and parts["weight.absmax"].shape == (8 * 128 // 32,)
    # the first code of each pair in the high nibble
    assert int(parts["weight"][0, 0]) == (int(codes[0, 0]) << 4) | int(codes[0, 1])
    state = json.loads(bytes(parts[bnb_format.STATE_KEY].tolist()).decode())
    assert state == {"quant_type": "nf4", "blocksize": 32, "dtype": "float32", "shape": [8, 128]}
    back, back_absmax, group = bnb_format.from_bnb(parts)
    assert group == 32 and torch.equal(back, codes) and torch.equal(back_absmax, absmax)


def test_bitsandbytes_decodes_our_tensors_to_our_weights_and_we_read_its_own():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    codes, absmax = _random_nf4(out=16, inp=256, group=64, seed=1)
    parts = bnb_format.to_bnb(codes, absmax, 64)
    state = bnbf.QuantState.from_dict({k: v for k, v in parts.items() if k != "weight"}, device=torch.device("cpu"))
    theirs = bnbf.dequantize_4bit(parts["weight"], state)
    assert torch.equal(theirs, nf_dequantize(codes, absmax, 4, 64))  # bit for bit
    # bitsandbytes' own quantization of a weight, read back by us, is its own dequantized weight
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    packed, own = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    read = bnb_format.from_bnb({"weight": packed, **{f"weight.{k}": v for k, v in own.as_dict(packed=True).items()}})
    assert torch.equal(nf_dequantize(read[0], read[1], 4, 64), bnbf.dequantize_4bit(packed, own))
    # and its codes are the nearest levels, as ours are
    ours, our_absmax = nf_quantize(w, 4, 64)
    assert torch.equal(read[0], ours) and torch.equal(read[1], our_absmax)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    model_dir = write_model_dir(root / "model")
    data = write_wikitext(root / "wikitext")
    made = {}
    for method, bits in (("loftq", 4), ("nf", 3)):
        recipe = root / f"{method}{bits}.yaml"
        recipe.write_text(f"model: {{name: {model_dir}}}\nquant: {{method: {method}, bits: {bits}, group_size: 32, lora_r: 4}}\n"
                          f"calib: {{root: {data}, n_windows: 2, seq_len: 16}}\noutput: {{dir: {root / recipe.stem}}}\n")
        made[f"{method}{bits}"] = quantize(str(recipe))
    return made


def _like_peftkit(model):
    from peftkit.quant.bnb_format import compute_in_float32

    return compute_in_float32(model)


def test_auto_model_loads_nf4_output_with_peftkits_weights_and_logits(outputs):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    out = outputs["loftq4"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4"
    ours = load_quantized(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu").eval()
    stored = load_quantized_weights(out)
    for name in stored:
        layer = theirs.get_submodule(name)
        layer = getattr(layer, "base_layer", layer)
        assert isinstance(layer, Linear4bit)
        mine = ours.get_base_model().get_submodule(name).base_layer
        assert isinstance(mine, PackedLinear)
        assert torch.equal(bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state), mine.unpack())
    assert not isinstance(theirs.lm_head, Linear4bit)  # kept in 16 bits, as written

    ids = torch.randint(5, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        # as loaded: float16 embeddings, norms and lm_head (and bfloat16 4-bit matmuls where the CPU has
        # AVX512-BF16) -> equal up to that rounding of the activations
        as_loaded = theirs(input_ids=ids).logits
        assert as_loaded.dtype == torch.float16
        torch.testing.assert_close(as_loaded.float(), expected, rtol=0, atol=5e-2)
        # computing in float32 as peftkit does: the same logits (LoRA included: transformers loaded the adapter).
        # A fresh load: bitsandbytes repacked the first one's weights for its bfloat16 kernel.
        theirs = _like_peftkit(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu").eval())
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
        theirs.disable_adapters()
        with ours.disable_adapter():
            base = ours(input_ids=ids).logits
            torch.testing.assert_close(theirs(input_ids=ids).logits, base, rtol=0, atol=1e-6)
        assert not torch.allclose(base, expected, atol=1e-4)  # the LoftQ LoRA does act


def test_auto_peft_model_gives_peftkits_model_with_lora(outputs):
    pytest.importorskip("bitsandbytes")
    from peft import AutoPeftModelForCausalLM

    out = outputs["loftq4"]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(out.resolve())
    ours = load_quantized(out)
    theirs = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, device_map="cpu").eval()
    layer = theirs.get_base_model().model.layers[0].mlp.down_proj
    assert type(layer).__module__.startswith("peft.tuners.lora.bnb")  # peft's LoRA on bitsandbytes' Linear4bit
    ids = torch.randint(5, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _like_peftkit(theirs)
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_nf3_output_stays_peftkit_only_and_says_so(outputs):
    out = outputs["nf3"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    info = json.loads((out / "quantization.json").read_text())
    assert info["storage"] == "nf" and info["loads_in"].startswith("peftkit only")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    name = "model.layers.0.mlp.down_proj"
    assert {f"{name}.qweight", f"{name}.absmax"} <= keys and f"{name}.weight" not in keys
    assert not any("quant_state" in k for k in keys)
    assert load_quantized_weights(out)[name].bits == 3


def test_nf4_at_a_group_size_bitsandbytes_lacks_stays_peftkit_only(tmp_path):
    model = structured_llama()
    result = quantize_model(model, options("nf", bits=4, group_size=16), None, log=lambda s: None)
    save_quantized(tmp_path / "q", model, result)
    assert "quantization_config" not in json.loads((tmp_path / "q" / "config.json").read_text())
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["storage"] == "nf"
    name = "model.layers.1.self_attn.o_proj"
    assert torch.equal(load_quantized_weights(tmp_path / "q")[name].codes, result.weights[name].codes)


def test_earlier_peftkit_layout_of_nf4_still_loads(tmp_path, monkeypatch):
    model = structured_llama()
    result = quantize_model(model, options("nf", bits=4, group_size=32), None, log=lambda s: None)
    save_quantized(tmp_path / "new", model, result)
    with monkeypatch.context() as m:  # what peftkit wrote for NF4 before: qweight + absmax, no quantization_config
        m.setattr(checkpoint, "stored_as_bnb", lambda quantized: False)
        save_quantized(tmp_path / "old", model, result)
    old, new = load_quantized_weights(tmp_path / "old"), load_quantized_weights(tmp_path / "new")
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(old[name].codes, new[name].codes) and torch.equal(old[name].scales, new[name].scales)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "old")(input_ids=ids).logits,
                           load_quantized(tmp_path / "new")(input_ids=ids).logits)
