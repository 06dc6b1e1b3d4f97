"""`peftkit quantize` on every pre-norm decoder family: LLaMA (and Llama-3's rope scaling), Mistral, Qwen2 (q/k/v
biases), Qwen3 (q_norm/k_norm), Gemma, Gemma-2 (softcapping, alternating sliding-window blocks), Phi-3 (fused
qkv_proj and gate_up_proj) and OPT; GPT-2 (Conv1D projections) is refused with its reason.

Each family is a tiny random model (hidden 64, 2 blocks, sliding windows shorter than the test windows). For each:
every block replays exactly what its decoder gave it; 2-bit RTN and ApiQ-bw outputs reload in peftkit to the
quantizer's own model; and for Mistral, Qwen2, Qwen3, Gemma and Phi-3 the quantize output and a LoRA fine-tuned on
it load with plain transformers + peft (GPTQModel's kernels) to peftkit's logits, as tests/quant/test_gptq_interop.py
shows for LLaMA."""

import pytest
import torch
from helpers.quant import stored_reference, structured_decoder, windows, write_model_dir, write_wikitext

PRE_NORM = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "opt"]
OUTSIDE_PEFTKIT = ["mistral", "qwen2", "qwen3", "gemma", "phi3"]
METHODS = ["rtn", "apiq-bw"]
GROUP = 32


@pytest.fixture(scope="module")
def wikitext(tmp_path_factory):
    return write_wikitext(tmp_path_factory.mktemp("wikitext"), words=1200)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, wikitext):
    """(label, method) -> (model dir, `peftkit quantize` output dir), each made once per module."""
    from peftkit.commands.quantize import quantize

    root, made = tmp_path_factory.mktemp("every-decoder"), {}

    def get(label: str, method: str):
        if (label, method) not in made:
            model_dir = root / label
            if not model_dir.exists():
                write_model_dir(model_dir, label)
            recipe = root / f"{label}-{method}.yaml"
            recipe.write_text(
                f"model: {{name: {model_dir}}}\n"
                f"quant: {{method: {method}, bits: 2, group_size: {GROUP}, lora_r: 4, epochs: 1, batch_size: 2}}\n"
                f"calib: {{root: {wikitext}, n_windows: 4, seq_len: 16}}\noutput: {{dir: {root / f'{label}-{method}'}}}\n")
            made[(label, method)] = (model_dir, quantize(str(recipe)))
        return made[(label, method)]

    return get


def _block_outputs(model, ids) -> list[torch.Tensor]:
    """What each block of ``model`` returns in the model's own forward."""
    from peftkit.models.families import layers_of

    outputs = []
    handles = [b.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
               for b in layers_of(model)]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outputs


@pytest.mark.parametrize("label", PRE_NORM)
def test_each_block_replays_exactly_what_its_decoder_passed_it(label):
    """Calibration runs every block alone on the captured inputs: with the keyword arguments the decoder passed that
    block (Gemma-2's and Qwen2's sliding-window blocks get a different mask than their full-attention ones), the
    chain of blocks reproduces the model's own forward block by block."""
    from peftkit.models.families import layers_of
    from peftkit.quant.block_inputs import capture_decoder_inputs
    from peftkit.quant.blocks import run_block_batched

    model, ids = structured_decoder(label), windows(3, 16, seed=4)
    hidden, kwargs = capture_decoder_inputs(model, layers_of(model), ids)
    expected = _block_outputs(model, ids)
    for block, block_kwargs, want in zip(layers_of(model), kwargs, expected):
        hidden = run_block_batched(block, hidden, block_kwargs, 2)
        torch.testing.assert_close(hidden, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("label", PRE_NORM)
def test_quantize_output_reloads_in_peftkit_to_the_quantizers_model(quantized, label, method):
    """2-bit RTN / ApiQ-bw on the CLI path (the model read block by block from its files); the output reloads packed
    to the logits of the full-precision model with the stored weights and the initial LoRA applied."""
    import json

    from transformers import AutoModelForCausalLM

    from peftkit.quant.checkpoint import load_quantized, load_quantized_weights, read_info
    from peftkit.quant.result import QuantResult

    model_dir, out = quantized(label, method)
    info = read_info(out)
    assert info["method"] == method and info["bits"] == 2 and info["storage"] == "gptq"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    projections = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert set(info["layers"]) == projections  # every projection of every block, fused ones included
    errors = json.loads((out / "errors.json").read_text())["blocks"]
    assert [b["index"] for b in errors] == [0, 1] and all(0 < b["rel_output_error"] < float("inf") for b in errors)

    from peft import PeftModel
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora = {}
    for key, value in adapter.items():  # base_model.model.<name>.lora_A.weight -> name
        name, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        lora.setdefault(name, [None, None])["AB".index(part[0])] = value.float()
    result = QuantResult(method, 2, GROUP, 4, info["lora"]["alpha"], info["lora"]["targets"],
                         weights=load_quantized_weights(out), lora={k: tuple(v) for k, v in lora.items()})
    ids = windows(2, 16, seed=5)
    loaded = load_quantized(out)
    assert isinstance(loaded, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, stored_reference(model, result)(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)
    if method == "apiq-bw":  # calibration moved B off zero: the initial LoRA acts
        assert any(B.abs().max() > 0 for _, B in result.lora.values())


def test_a_decoder_with_conv1d_projections_is_refused_with_its_reason(tmp_path, wikitext):
    """GPT-2 stores its projections transposed (Conv1D): exit 2 before anything is written, saying why."""
    from helpers.reliability import invoke, write_recipe

    model_dir = write_model_dir(tmp_path / "gpt2", "gpt2")
    recipe = write_recipe(tmp_path / "q.yaml", {
        "model": {"name": str(model_dir)}, "quant": {"method": "rtn", "bits": 2, "group_size": GROUP},
        "calib": {"root": str(wikitext)}, "output": {"dir": str(tmp_path / "out")}})
    result = invoke("quantize", recipe)
    assert result.exit_code == 2, result.output
    assert "a gpt2 model cannot be quantized: its projections are Conv1D layers" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def _same_logits(theirs, ours, ids, atol):
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("label", OUTSIDE_PEFTKIT)
def test_quantized_and_fine_tuned_outputs_load_outside_peftkit(quantized, wikitext, tmp_path, label, method):
    """transformers + GPTQModel build the quantize output's model, peft's AutoPeftModel the model with its initial
    LoRA and with the LoRA fine-tuned on it (method apiq), each with peftkit's logits (tolerances as for LLaMA in
    tests/quant/test_gptq_interop.py)."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from peftkit.artifacts.load import load_run
    from peftkit.commands.train import finetune
    from peftkit.quant.checkpoint import load_quantized

    _, out = quantized(label, method)
    ids = windows(2, 16, seed=6, vocab=30)
    ours = load_quantized(out)
    theirs = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, device_map="cpu").eval()
    assert all("gptqmodel" in type(m.base_layer).__module__ for m in theirs.modules() if hasattr(m, "base_layer"))
    _same_logits(theirs, ours, ids, 1e-6)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu").eval()
    _same_logits(plain, ours, ids, 2e-3)  # transformers loads the adapter in float16 (the checkpoint's dtype)
    plain.disable_adapters()
    with ours.disable_adapter():
        _same_logits(plain, ours, ids, 1e-6)

    run = finetune({"model": {"name": str(out), "task_head": "causal_lm"},
                    "data": {"task": "wikitext2", "root": str(wikitext), "max_length": 16, "eval_limit": 2},
                    "method": {"name": "apiq"}, "output": {"dir": str(tmp_path / "run")},
                    "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "seed": 3, "eval_every": 2,
                              "warmup_ratio": 0.0, "threads": 1}}, [])
    tuned, _, _ = load_run(run, plain_head="causal_lm")
    theirs = AutoPeftModelForCausalLM.from_pretrained(str(run / "final"), dtype=torch.float32, device_map="cpu").eval()
    _same_logits(theirs, tuned, ids, 1e-6)
    with torch.no_grad():  # the fine-tuned LoRA differs from the quantizer's
        assert not torch.equal(tuned(input_ids=ids).logits, ours(input_ids=ids).logits)


@pytest.mark.parametrize("method,bits,storage", [("nf", 4, "bitsandbytes"), ("loftq", 3, "nf"), ("apiq-lw", 2, "gptq"),
                                                 ("gptq", 3, "gptq")])
@pytest.mark.parametrize("label", ["qwen2", "gemma2", "phi3"])
def test_every_quantizer_reloads_on_biased_softcapped_and_fused_families(tmp_path, label, method, bits, storage):
    """The other quantizers on Qwen2 (q/k/v biases), Gemma-2 (softcapping, sliding window) and Phi-3 (fused
    projections): the output reloads in peftkit to the quantizer's model; an NF4 output also loads with transformers +
    bitsandbytes to peftkit's logits (computing in float32, as tests/quant/test_bnb_interop.py does for LLaMA)."""
    from helpers.quant import options

    from peftkit.quant.bnb_format import compute_in_float32
    from peftkit.quant.checkpoint import load_quantized, read_info, save_quantized
    from peftkit.quant.pipeline import quantize_model

    model = structured_decoder(label)
    result = quantize_model(model, options(method, bits=bits, group_size=GROUP, epochs=1), windows(4, 16),
                            log=lambda s: None)
    save_quantized(tmp_path / "q", model, result)
    assert read_info(tmp_path / "q")["storage"] == storage
    ids = windows(2, 16, seed=7)
    ours = load_quantized(tmp_path / "q")
    _same_logits(ours, stored_reference(model, result), ids, 1e-5)
    if storage == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
        from transformers import AutoModelForCausalLM

        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32, device_map="cpu").eval()
        _same_logits(compute_in_float32(theirs), ours, ids, 1e-6)
