"""Every weights file peftkit loads is checked before it is opened: a pickle is refused without unpickling, a
truncated safetensors file or a missing one is named, and a floating tensor holding NaN is refused with its name.

The hostile directories are made from real tiny runs (a BERT classifier on sst2 with lora, full and pafi; a LLaMA
with lora on WikiText-shaped text), exports and quantize outputs, copied per test and damaged one file at a time.
Each command (eval, predict, export, generate) must exit 2 with one paragraph naming the file, never a traceback.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers.reliability import invoke, make_setup, recipe

from peftkit.errors import UserError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("loaded-files"))


@pytest.fixture(scope="module")
def runs(setup):
    """method -> a finished tiny sst2 run directory (each test damages its own copy)."""
    from peftkit.commands.train import finetune

    done = {}
    for method in ("lora", "full", "pafi"):
        r = recipe(setup, f"run-{method}", method, max_steps=2, save_every=2, eval_every=2)
        if method == "pafi":
            r["method"]["rho"] = 0.3
        done[method] = finetune(r, [])
    return done


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A finished tiny causal-LM lora run (what `peftkit generate` and `eval --task wikitext2` load)."""
    from helpers.quant import write_model_dir, write_wikitext

    from peftkit.commands.train import finetune

    root = tmp_path_factory.mktemp("lm")
    model, data = write_model_dir(root / "model"), write_wikitext(root / "wt", words=600)
    return finetune({"model": {"name": str(model), "task_head": "causal_lm"},
                     "data": {"task": "wikitext2", "root": str(data), "max_length": 32, "eval_limit": 2},
                     "method": {"name": "lora"}, "output": {"dir": str(root / "run")},
                     "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "seed": 3, "eval_every": 2,
                               "warmup_ratio": 0.0, "threads": 1}}, [])


@pytest.fixture
def copy_of(tmp_path):
    def make(directory: Path) -> Path:
        return Path(shutil.copytree(directory, tmp_path / Path(directory).name, symlinks=True))

    return make


@pytest.fixture
def no_unpickling(monkeypatch):
    """torch.load (what transformers and peft unpickle .bin files with) fails the test if anything calls it."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickle file")

    monkeypatch.setattr(torch, "load", refuse)


def _refused(result, *needles: str) -> str:
    assert result.exit_code == 2, f"exit {result.exit_code}, {result.exception!r}, output:\n{result.output}"
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    return text


def put_nan(path: Path) -> str:
    """Write a NaN into the first floating tensor of the safetensors file ``path`` (metadata kept); its name."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in sorted(tensors) if tensors[k].is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    return name


def to_pickle(path: Path, pickle_name: str) -> Path:
    """Replace the safetensors file ``path`` by the same tensors pickled with torch.save (as older tools wrote)."""
    import torch
    from safetensors.torch import load_file

    target = path.with_name(pickle_name)
    torch.save(load_file(str(path)), target)
    path.unlink()
    return target


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64])


def eval_glue(run: Path, setup: dict):
    return invoke("eval", "--task", "glue", "--model", str(run), "--data-root", str(setup["data"]))


def predict(run: Path, tmp_path: Path):
    rows = tmp_path / "rows.csv"
    rows.write_text("sentence\na good movie\nawful and boring\n")
    return invoke("predict", str(run), "--input", str(rows))


# ---- NaN in saved weights ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method, weights", [("lora", "adapter_model.safetensors"), ("full", "model.safetensors"),
                                             ("pafi", "adapter.safetensors")])
def test_a_nan_in_a_runs_weights_is_refused_with_the_tensor_named(runs, setup, copy_of, tmp_path, method, weights):
    run = copy_of(runs[method])
    path = run / "final" / weights
    name = put_nan(path)
    for result in (eval_glue(run, setup), predict(run, tmp_path)):
        _refused(result, str(path), repr(name), "NaN or infinite")
    assert not (run / "eval").exists()


def test_a_nan_in_a_base_model_is_refused_at_load(runs, setup, copy_of, tmp_path):
    """The run is intact; the model directory its base loads from was damaged afterwards."""
    run = runs["lora"]
    model = Path(setup["model"])
    saved = tmp_path / "saved-weights.safetensors"
    shutil.copy2(model / "model.safetensors", saved)
    try:
        name = put_nan(model / "model.safetensors")
        _refused(eval_glue(run, setup), str(model / "model.safetensors"), repr(name), "NaN or infinite")
    finally:
        shutil.copy2(saved, model / "model.safetensors")


@pytest.mark.parametrize("method, merge, weights", [
    ("lora", False, "adapter_model.safetensors"), ("pafi", False, "delta.safetensors"), ("lora", True, "model.safetensors"),
    ("lora", False, "base/model.safetensors"), ("pafi", False, "base/model.safetensors")])
def test_a_nan_in_an_export_is_refused(runs, tmp_path, method, merge, weights):
    import peftkit
    from peftkit.commands.export import export

    out = export(str(runs[method]), str(tmp_path / "export"), merge)
    name = put_nan(out / weights)
    with pytest.raises(UserError) as e:
        peftkit.load(out)
    text = " ".join(str(e.value).split())
    assert str(out / weights) in text and repr(name) in text and "NaN or infinite" in text, text


def test_a_nan_in_a_quantize_output_is_refused(tmp_path):
    from helpers.quant import write_quantized_setup

    from peftkit.quant.checkpoint import load_quantized

    _, quant_dir, _ = write_quantized_setup(tmp_path, words=200)
    name = put_nan(quant_dir / "model.safetensors")
    with pytest.raises(UserError) as e:
        load_quantized(quant_dir)
    text = " ".join(str(e.value).split())
    assert str(quant_dir / "model.safetensors") in text and repr(name) in text and "peftkit quantize" in text, text


def test_a_nan_in_a_language_model_run_is_refused_by_generate(lm_run, copy_of):
    run = copy_of(lm_run)
    path = run / "final" / "adapter_model.safetensors"
    name = put_nan(path)
    _refused(invoke("generate", str(run), "--prompt", "the movie", "--max-new-tokens", "2"),
             str(path), repr(name), "NaN or infinite")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_entry_anywhere_is_found_and_large_finite_ones_are_not(tmp_path, dtype, bad):
    import torch
    from safetensors.torch import save_file

    from peftkit.models.load import nonfinite_tensor

    dtype = getattr(torch, dtype)
    big = torch.full((300, 257), torch.finfo(dtype).max, dtype=dtype)  # a sum of these would overflow
    ints = torch.full((40,), 7, dtype=torch.int32)
    save_file({"a.big": big, "b.ints": ints}, str(tmp_path / "fine.safetensors"))
    assert nonfinite_tensor(tmp_path / "fine.safetensors") is None
    damaged = big.clone()
    damaged[211, 130] = bad
    save_file({"a.big": big, "b.ints": ints, "c.damaged": damaged}, str(tmp_path / "bad.safetensors"))
    assert nonfinite_tensor(tmp_path / "bad.safetensors") == "c.damaged"


def test_finite_weights_cost_one_read_per_file(runs):
    """A file already checked in this process is not read again (a base loaded for every run of a bench)."""
    from peftkit.models import load

    path = runs["lora"] / "final" / "adapter_model.safetensors"
    assert load.nonfinite_tensor(path) is None
    key = next(k for k in load._FINITE_CHECKED if k[0] == str(path.resolve()))
    load._FINITE_CHECKED[key] = "marked"  # what the memo answers, where a new read would answer None
    try:
        assert load.nonfinite_tensor(path) == "marked"
    finally:
        load._FINITE_CHECKED.pop(key)


# ---- pickles, truncated and missing files -----------------------------------------------------------------

@pytest.mark.parametrize("method, weights, pickle_name", [("lora", "adapter_model.safetensors", "adapter_model.bin"),
                                                          ("full", "model.safetensors", "pytorch_model.bin")])
def test_pickled_weights_are_refused_without_unpickling(runs, setup, copy_of, tmp_path, no_unpickling, method,
                                                        weights, pickle_name):
    run = copy_of(runs[method])
    pickled = to_pickle(run / "final" / weights, pickle_name)
    for result in (eval_glue(run, setup), predict(run, tmp_path)):
        _refused(result, str(pickled), "pickle")
    with pytest.raises(UserError, match="pickle"):
        from peftkit.commands.export import export

        export(str(run), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, weights", [("lora", "adapter_model.safetensors"), ("full", "model.safetensors"),
                                             ("pafi", "adapter.safetensors")])
def test_a_truncated_final_is_refused_by_every_command(runs, setup, copy_of, tmp_path, method, weights):
    run = copy_of(runs[method])
    path = run / "final" / weights
    truncate(path)
    _refused(eval_glue(run, setup), str(path), "not a valid safetensors file")
    _refused(predict(run, tmp_path), str(path), "not a valid safetensors file")
    _refused(invoke("export", str(run), "--out", str(tmp_path / "out")), str(path), "not a valid safetensors file")
    assert not (tmp_path / "out").exists()


def test_a_truncated_language_model_run_is_refused_by_generate_and_eval(lm_run, copy_of, tmp_path):
    run = copy_of(lm_run)
    path = run / "final" / "adapter_model.safetensors"
    truncate(path)
    _refused(invoke("generate", str(run), "--prompt", "the movie"), str(path), "not a valid safetensors file")
    data = Path(lm_run).parent / "wt"  # the fixture's text: --data-root is where eval reads it
    _refused(invoke("eval", "--task", "wikitext2", "--model", str(run), "--data-root", str(data)),
             str(path), "not a valid safetensors file")


def test_a_missing_state_file_is_named(runs, setup, copy_of):
    run = copy_of(runs["pafi"])
    (run / "final" / "adapter.safetensors").unlink()
    _refused(eval_glue(run, setup), str(run / "final" / "adapter.safetensors"), "does not exist")


def test_a_damaged_export_is_refused_before_loading(runs, tmp_path, no_unpickling):
    import peftkit
    from peftkit.commands.export import export

    out = export(str(runs["lora"]), str(tmp_path / "peft"), False)
    truncate(out / "adapter_model.safetensors")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        peftkit.load(out)
    to_pickle(out / "base" / "model.safetensors", "pytorch_model.bin")
    shutil.copy2(runs["lora"] / "final" / "adapter_model.safetensors", out / "adapter_model.safetensors")
    with pytest.raises(UserError, match="pickle"):
        peftkit.load(out)


# ---- a plain transformers checkpoint under eval ------------------------------------------------------------

def test_a_plain_checkpoint_evaluates_with_the_head_its_config_describes(setup):
    """A directory saved by AutoModelForSequenceClassification.save_pretrained: num_labels from its config, and the
    accuracy peftkit reports is the one transformers' own forward pass gives on the same rows."""
    import json

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(setup["model"])
    result = invoke("eval", "--task", "glue:sst2", "--model", str(model_dir), "--data-root", str(setup["data"]),
                    "--json", str(model_dir.parent / "plain-eval.json"))
    assert result.exit_code == 0, result.output
    reported = json.loads((model_dir.parent / "plain-eval.json").read_text())["rows"][0]["accuracy"]
    rows = [json.loads(line) for line in (Path(setup["data"]) / "sst2" / "validation.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(**tokenizer([r["sentence"] for r in rows], padding=True, truncation=True, max_length=128,
                                   return_tensors="pt")).logits
    expected = sum(int(p == r["label"]) for p, r in zip(logits.argmax(-1).tolist(), rows)) / len(rows)
    assert reported == pytest.approx(round(expected, 4))


def test_a_plain_checkpoint_whose_head_does_not_fit_the_task_exits_2(setup, tmp_path):
    from helpers.tiny import save_tiny_classifier

    three = save_tiny_classifier(tmp_path / "three-labels", num_labels=3)
    _refused(invoke("eval", "--task", "glue:sst2", "--model", str(three), "--data-root", str(setup["data"])),
             str(three), "3 output(s)", "sst2 needs 2 outputs")
    _refused(invoke("eval", "--task", "glue:stsb", "--model", str(setup["model"]), "--data-root", str(setup["data"])),
             "2 output(s)", "stsb needs 1 output")


# ---- other places that load saved weights ------------------------------------------------------------------

def test_the_latency_bench_refuses_a_damaged_merged_export(runs, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from peftkit.bench.latency import exported_contenders
    from peftkit.commands.export import export

    out = export(str(runs["lora"]), str(tmp_path / "merged"), True)
    base = AutoModelForSequenceClassification.from_pretrained(out)
    name = put_nan(out / "model.safetensors")
    with pytest.raises(UserError) as e:
        exported_contenders([str(out)], base)
    assert repr(name) in str(e.value) and str(out / "model.safetensors") in str(e.value)


def test_apiq_refuses_a_quantize_output_whose_lora_holds_nan(tmp_path):
    from helpers.quant import write_quantized_setup

    _, quant_dir, data = write_quantized_setup(tmp_path, words=200)
    name = put_nan(quant_dir / "adapter_model.safetensors")
    out = tmp_path / "run-apiq"
    r = {"model": {"name": str(quant_dir), "task_head": "causal_lm"},
         "data": {"task": "wikitext2", "root": str(data), "max_length": 32, "eval_limit": 2},
         "method": {"name": "apiq"}, "output": {"dir": str(out)},
         "train": {"max_steps": 1, "batch_size": 4, "seed": 3, "threads": 1}}
    from helpers.reliability import write_recipe

    _refused(invoke("finetune", write_recipe(tmp_path / "apiq.yaml", r)),
             str(quant_dir / "adapter_model.safetensors"), repr(name), "peftkit quantize")
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
