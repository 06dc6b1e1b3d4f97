"""`peftkit export --merge` of LoRA on a quantized base: the merged export stays low-bit (a GPTQ or bitsandbytes NF4
checkpoint without adapter), loads in plain transformers, and the calibrated merge is closer to the unmerged model
than the naive rounding merge."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers.quant import options, write_model_dir, write_wikitext
from test_export_rules import lm_runs  # noqa: F401  (a fixture: an apiq run on a 2-bit RTN base and a LoRA run)

from peftkit.artifacts.load import load_run
from peftkit.commands.export import export
from peftkit.errors import UserError

SEQ = 32
LOAD_PLAIN = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, device_map="cpu").eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(input_ids=ids).logits
assert not any(m == "peftkit" or m.startswith("peftkit.") for m in sys.modules), "peftkit was imported"
assert not any("lora" in n.lower() for n, _ in model.named_modules()), "an adapter was loaded"
print(json.dumps(logits.tolist()))
"""


def quantized_lora_run(root, label: str, method: str = "rtn", bits: int = 3, group_size: int = 16):
    """A tiny decoder of family ``label``, its `peftkit quantize`-format output and a short apiq fine-tune on
    WikiText-shaped text, with the LoRA pushed well away from zero (so that merging it has something to keep)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.commands.train import finetune
    from peftkit.quant.checkpoint import save_quantized
    from peftkit.quant.pipeline import quantize_model

    model_dir = write_model_dir(root / "model", label)
    data = write_wikitext(root / "wt", words=3000)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    result = quantize_model(model, options(method, bits=bits, group_size=group_size), None, log=lambda s: None)
    save_quantized(root / "q", model, result, AutoTokenizer.from_pretrained(model_dir))
    return finetune({"model": {"name": str(root / "q"), "task_head": "causal_lm"},
                     "data": {"task": "wikitext2", "root": str(data), "max_length": SEQ, "eval_limit": 2},
                     "method": {"name": "apiq"}, "output": {"dir": str(root / "run")},
                     "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-2, "seed": 3, "eval_every": 6,
                               "warmup_ratio": 0.0, "threads": 1}}, [])


def held_out_ids(data_dir, tokenizer, n: int = 3) -> torch.Tensor:
    from peftkit.utils.text_windows import consecutive_windows, token_ids

    ids = token_ids(tokenizer, (data_dir / "wiki.test.raw").read_text())
    return consecutive_windows(ids, SEQ, n)


def plain_transformers_logits(directory, ids) -> torch.Tensor:
    """Logits of ``directory`` as transformers alone loads it, in a fresh process that never imports peftkit."""
    done = subprocess.run([sys.executable, "-c", LOAD_PLAIN, str(directory), json.dumps(ids.tolist())],
                          capture_output=True, text=True, timeout=300, cwd=directory.parent,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))


def _relative(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _tensor_bytes(path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(str(path)).values())


@pytest.mark.slow
@pytest.mark.parametrize("label, method, bits, group", [("llama", "rtn", 3, 16), ("mistral", "rtn", 2, 16),
                                                         ("llama", "nf", 4, 32)])
def test_calibrated_merge_loads_in_plain_transformers_and_beats_the_naive_merge(tmp_path, label, method, bits, group):
    from safetensors.torch import load_file

    run = quantized_lora_run(tmp_path, label, method, bits, group)
    unmerged, tokenizer, _ = load_run(run)
    ids = held_out_ids(tmp_path / "wt", tokenizer)
    with torch.no_grad():
        reference = unmerged(input_ids=ids).logits
        with unmerged.disable_adapter():
            assert _relative(unmerged(input_ids=ids).logits, reference) > 0.02  # the LoRA does change the model
    exports = {mode: export(str(run), str(tmp_path / mode), merge_mode=mode, calib_windows=8, calib_len=SEQ)
               for mode in ("naive", "calibrated")}
    errors = {}
    for mode, out in exports.items():
        assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
        config = json.loads((out / "config.json").read_text())
        storage = "gptq" if method == "rtn" else "bitsandbytes"
        assert config["quantization_config"]["quant_method"] == storage
        if storage == "gptq":
            assert (config["quantization_config"]["bits"], config["quantization_config"]["group_size"]) == (bits, group)
        # the same bytes as the base: same codes per weight, same scales, the rest copied
        assert _tensor_bytes(out / "model.safetensors") == _tensor_bytes(tmp_path / "q" / "model.safetensors")
        info = json.loads((out / "export.json").read_text())["export"]
        assert info["format"] == "transformers" and info["merge_mode"] == mode
        errors[mode] = _relative(plain_transformers_logits(out, ids), reference)
    assert errors["calibrated"] < errors["naive"], errors
    card = (exports["calibrated"] / "README.md").read_text()
    assert f"bits: {bits}, group size: {group}" in card and "8 windows x 32 tokens" in card and "%" in card
    # peftkit's own loader serves the merged export too, with the same logits transformers computes
    again, _, _ = load_run(exports["calibrated"])
    base = load_file(str(tmp_path / "q" / "model.safetensors"))
    merged = load_file(str(exports["calibrated"] / "model.safetensors"))
    assert set(base) == set(merged)
    with torch.no_grad():  # (transformers keeps a bitsandbytes file's float16 tensors: compared in float32)
        torch.testing.assert_close(again(input_ids=ids).logits.float(),
                                   plain_transformers_logits(exports["calibrated"], ids), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_written_codes_round_trip_bit_exactly(tmp_path):
    """Unpacking the written GPTQ tensors and packing the codes, scales and zero points again gives the same
    tensors, bit for bit; and they decode to what the merge chose."""
    from safetensors.torch import load_file

    from peftkit.quant.checkpoint import load_quantized_weights
    from peftkit.quant.gptq_format import from_gptq, to_gptq

    run = quantized_lora_run(tmp_path, "llama", "rtn", 3, 16)
    out = export(str(run), str(tmp_path / "merged"), calib_windows=4, calib_len=SEQ)
    written = load_file(str(out / "model.safetensors"))
    layers = json.loads((out / "quantization.json").read_text())["layers"]
    base = load_quantized_weights(tmp_path / "q")
    changed = 0
    for name, layer in layers.items():
        parts = {k: written[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        codes, scales, zeros = from_gptq(parts, layer["bits"])
        again = to_gptq(codes, scales.float(), zeros, layer["bits"], layer["group_size"])
        for key, tensor in again.items():
            assert tensor.dtype == parts[key].dtype and torch.equal(tensor, parts[key]), (name, key)
        changed += int(not torch.equal(codes.to(torch.uint8), base[name].codes))
    assert changed > 0  # the merge did write new codes (the LoRA is in them)


def test_float_merge_mode_keeps_the_full_precision_merge(tmp_path):
    """--merge-mode float is the merge every earlier peftkit did: a plain model of the base architecture whose logits
    are the unmerged run's."""
    from transformers import AutoModelForCausalLM

    run = quantized_lora_run(tmp_path, "llama", "rtn", 2, 16)
    model, tokenizer, _ = load_run(run)
    ids = held_out_ids(tmp_path / "wt", tokenizer, 2)
    out = export(str(run), str(tmp_path / "float"), True, merge_mode="float")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_end_to_end_tuning_moves_only_scales_and_norms_and_brings_the_merge_closer_to_the_unmerged_model(tmp_path):
    """The block-wise merge, then its scales and norms tuned against the unmerged model's next-token distributions:
    the codes and zero points stay as the block-wise merge chose them, the norms written are the tuned ones, the
    bytes do not change, and on windows neither stage saw the merged logits move towards the unmerged model's. With
    a learning rate of 0 nothing improves, and the block-wise merge is kept as it was."""
    from safetensors.torch import load_file

    from peftkit.artifacts.lowbit_merge import quantized_base_of
    from peftkit.quant.checkpoint import load_quantized_base
    from peftkit.quant.merge import MergeResult, MergeSettings, merge_lowbit, save_merged, tune_end_to_end
    from peftkit.utils.text_windows import random_windows, token_ids

    run = quantized_lora_run(tmp_path, "llama", "rtn", 2, 16)
    unmerged, tokenizer, info = load_run(run)
    base_dir, _ = quantized_base_of(info)
    windows = random_windows(token_ids(tokenizer, (tmp_path / "wt" / "wiki.valid.tokens").read_text()), 28, SEQ, seed=1)
    ids = held_out_ids(tmp_path / "wt", tokenizer)
    settings = MergeSettings(mode="calibrated", tune_epochs=3, tune_lr=1e-2)
    result = merge_lowbit(unmerged, windows[:8], settings, log=lambda s: None)
    blockwise = dict(result.weights)
    report = tune_end_to_end(unmerged, result, windows[8:24], windows[24:], settings, log=lambda s: None)
    assert report["kept"] and report["check_kl_after"] < report["check_kl_before"]
    written = {}
    for label, weights, tensors in (("blockwise", blockwise, {}), ("tuned", result.weights, result.tensors)):
        out = tmp_path / label
        out.mkdir()
        save_merged(out, base_dir, MergeResult(weights=weights, tensors=tensors), {"mode": label})
        written[label] = load_file(str(out / "model.safetensors"))
        with torch.no_grad():
            written[label + "_error"] = _relative(load_quantized_base(out)(input_ids=ids).logits,
                                                  unmerged(input_ids=ids).logits)
    assert written["tuned_error"] < written["blockwise_error"], written
    assert set(written["tuned"]) == set(written["blockwise"])
    norms = [k for k in written["tuned"] if "norm" in k]
    assert norms and all(written["tuned"][k].dtype == written["blockwise"][k].dtype for k in written["tuned"])
    assert any(not torch.equal(written["tuned"][k], written["blockwise"][k]) for k in norms)
    for name in blockwise:
        assert torch.equal(written["tuned"][f"{name}.qweight"], written["blockwise"][f"{name}.qweight"])
        assert torch.equal(written["tuned"][f"{name}.qzeros"], written["blockwise"][f"{name}.qzeros"])
    assert any(not torch.equal(written["tuned"][f"{n}.scales"], written["blockwise"][f"{n}.scales"]) for n in blockwise)
    # nothing to gain: the block-wise merge stands, object for object
    again = merge_lowbit(unmerged, windows[:8], settings, log=lambda s: None)
    before = dict(again.weights)
    frozen = MergeSettings(mode="calibrated", tune_epochs=1, tune_lr=0.0)
    assert not tune_end_to_end(unmerged, again, windows[8:12], windows[24:], frozen, log=lambda s: None)["kept"]
    assert again.weights == before and again.tensors == {}


@pytest.mark.parametrize("kwargs, words", [
    ({"merge": False, "merge_mode": "calibrated"}, "only apply to a merged export"),
    ({"merge_mode": "rounded"}, "is not one of calibrated, naive, float"),
    ({"merge_mode": "float", "calib": "wikitext2"}, "a float merge reads no calibration text"),
    ({"calib": "glue"}, "is not one of train, wikitext2"),
    ({"calib_windows": 0}, "must be at least 1"),
    ({"calib_len": 100000}, "not enough for one window"),
    ({"tune_windows": 0}, "must be at least 1"),
    ({"tune_epochs": -1}, "must be 0 .no end-to-end tuning. or more"),
    ({"tune_lr": 0.0}, "must lie between 0 and 1"),
    ({"merge_mode": "naive", "tune_epochs": 2}, "the naive merge rounds onto the base's grid without tuning"),
    ({"merge_mode": "float", "tune_windows": 4}, "a float merge reads no calibration text"),
])
def test_merge_settings_that_do_not_fit_are_refused_before_anything_is_written(lm_runs, tmp_path, kwargs, words):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=words):
        export(str(lm_runs[0]), str(out), **kwargs)
    assert not out.exists() and not list(tmp_path.glob(".export-*"))


def test_a_merge_mode_on_a_run_without_a_quantized_base_is_refused_with_exit_2(lm_runs, tmp_path):
    from helpers.reliability import invoke

    result = invoke("export", str(lm_runs[1]), "--out", str(tmp_path / "out"), "--merge-mode", "calibrated")
    assert result.exit_code == 2, result.output
    assert "merges into its full-precision weights" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_merge_bench_reports_every_merge_with_bytes_and_latency(tmp_path, monkeypatch):
    from peftkit.bench.merge import run as bench_run

    run = quantized_lora_run(tmp_path, "llama", "rtn", 3, 16)
    monkeypatch.setenv("PEFTKIT_WIKITEXT", str(tmp_path / "wt"))
    rows = bench_run(True, {"runs": [str(run)], "calib_windows": 4, "calib_seq_len": SEQ, "ppl_windows": 2,
                            "ppl_seq_len": SEQ, "gen_prompt": 8, "gen_tokens": 4, "gen_repeats": 1})
    by = {r["merge"]: r for r in rows}
    assert list(by) == ["unmerged", "naive", "blockwise", "calibrated", "float"] and all(r["bits"] == 3 for r in rows)
    assert by["calibrated"]["tuning"]["epochs"] and by["calibrated"]["seconds"] >= by["blockwise"]["seconds"]
    assert all(r["ppl"] > 1 and r["ms_per_token"] > 0 for r in rows)
    assert by["naive"]["model_bytes"] == by["calibrated"]["model_bytes"] == by["calibrated"]["base_model_bytes"]
    assert by["unmerged"]["model_bytes"] > by["calibrated"]["model_bytes"]  # the adapter
    assert by["float"]["model_bytes"] > 4 * by["calibrated"]["model_bytes"] // 2  # float32 weights
    assert by["unmerged"]["ppl_vs_unmerged"] == 1.0


def test_merge_bench_without_runs_says_what_to_give():
    from peftkit.bench.merge import run as bench_run

    with pytest.raises(UserError, match="needs runs"):
        bench_run(True, {})


def test_a_base_with_no_low_bit_form_outside_peftkit_is_refused_and_float_still_merges(tmp_path):
    """NF3 codes have no transformers / bitsandbytes layout: a low-bit merge asked for is refused (exit 2 words,
    nothing written) and says what works instead; the default --merge is then the float merge."""
    run = quantized_lora_run(tmp_path, "llama", "nf", 3, 16)
    with pytest.raises(UserError, match="no low-bit form outside peftkit.*--merge-mode float"):
        export(str(run), str(tmp_path / "out"), merge_mode="calibrated")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".export-*"))
    out = export(str(run), str(tmp_path / "default"))
    assert json.loads((out / "export.json").read_text())["export"]["merge_mode"] == "float"
