"""The bad-input catalogue of docs/RELIABILITY.md: each input gives exit 2, one clear message, and no run dir.

Most rows go through the CLI in-process (Typer's runner: the same `_run` exit-code path as the real
command, without paying the interpreter start-up each time); the first rows run the real entry point
in a subprocess to show that the in-process path and the installed command agree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from helpers.reliability import invoke, make_setup, recipe, run_cli, write_recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("bad-input"))


def _refused(result, *needles: str) -> str:
    text = result.output if hasattr(result, "output") else result.stdout + result.stderr
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == 2, f"exit {code}, output:\n{text}"
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    return text


def _finetune(setup, tmp_path, content, *overrides):
    """Run `peftkit finetune` on a recipe; check that the run directory was not created."""
    path = write_recipe(tmp_path / "recipe.yaml", content)
    result = invoke("finetune", path, *overrides)
    out = Path(setup["root"]) / "out"
    assert not out.exists(), f"a failed run left {sorted(p.name for p in out.iterdir())}"
    return result


# ---- recipes ---------------------------------------------------------------------------------------

@pytest.mark.subprocess
def test_malformed_yaml_subprocess(tmp_path):
    path = write_recipe(tmp_path / "bad.yaml", "train:\n  lr: [1e-3\n  epochs: 2\n")
    _refused(run_cli("finetune", path), "not valid YAML", "line")


@pytest.mark.subprocess
def test_unknown_key_subprocess(setup, tmp_path):
    r = recipe(setup, "out")
    r["train"]["learning_rate"] = 1e-3
    path = write_recipe(tmp_path / "r.yaml", r)
    _refused(run_cli("finetune", path), "train.learning_rate", 'did you mean "lr"')
    assert not (Path(setup["root"]) / "out").exists()


def test_recipe_file_missing(tmp_path):
    _refused(invoke("finetune", str(tmp_path / "nope.yaml")), "neither a file nor a recipe name")


def test_recipe_not_a_mapping(setup, tmp_path):
    _refused(_finetune(setup, tmp_path, "- a\n- b\n"), "must be a mapping")


def test_recipe_binary_file(setup, tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01garbage")
    _refused(invoke("finetune", str(path)), "cannot read recipe")


def test_recipe_impossible_date_value(setup, tmp_path):
    _refused(_finetune(setup, tmp_path, "train:\n  lr: 2024-02-30\n"), "not valid YAML")


def test_wrong_types_all_listed(setup, tmp_path):
    r = recipe(setup, "out")
    r["train"].update(lr="abc", batch_size="eight", group_by_length="yes")
    r["model"]["dtype"] = "float8"
    text = _refused(_finetune(setup, tmp_path, r), "4 problems", "train.lr", "train.batch_size",
                    "train.group_by_length", "model.dtype")
    assert "expected a number" in text and "expected an integer" in text


@pytest.mark.parametrize("key,value,needle", [
    ("batch_size", 0, "train.batch_size: must be >= 1"),
    ("lr", -1e-3, "train.lr: must be > 0"),
    ("epochs", float("inf"), "train.epochs: must be a finite number"),
    ("warmup_ratio", 1.5, "train.warmup_ratio"),
    ("max_steps", -3, "train.max_steps"),
])
def test_values_out_of_range(setup, tmp_path, key, value, needle):
    r = recipe(setup, "out")
    r["train"][key] = value
    _refused(_finetune(setup, tmp_path, r), needle)


def test_unknown_section(setup, tmp_path):
    r = recipe(setup, "out")
    r["trian"] = {"lr": 1}
    _refused(_finetune(setup, tmp_path, r), "trian: unknown section", 'did you mean "train"')


def test_unknown_method(setup, tmp_path):
    _refused(_finetune(setup, tmp_path, recipe(setup, "out", method="lorra")), "unknown method 'lorra'", '"lora"')


def test_unknown_model_alias(setup, tmp_path):
    r = recipe(setup, "out")
    r["model"]["name"] = "minilm-l7"
    _refused(_finetune(setup, tmp_path, r), 'model "minilm-l7"', "offline aliases")


def test_model_directory_without_weights(setup, tmp_path):
    from helpers.tiny import tiny_bert_tokenizer

    tiny_bert_tokenizer(tmp_path / "tokenizer-only")  # a tokenizer but no config.json / weights
    r = recipe(setup, "out")
    r["model"]["name"] = str(tmp_path / "tokenizer-only")
    _refused(_finetune(setup, tmp_path, r), "cannot load model")


def test_unknown_task(setup, tmp_path):
    _refused(_finetune(setup, tmp_path, recipe(setup, "out", task="sst3")), "unknown task 'sst3'", '"sst2"')


@pytest.mark.parametrize("rho", [0, 1, 1.5, -0.1])
def test_pafi_rho_outside_open_interval(setup, tmp_path, rho):
    r = recipe(setup, "out", method="pafi")
    r["method"]["rho"] = rho
    _refused(_finetune(setup, tmp_path, r), "method.rho: must be > 0 and < 1")


def test_method_option_of_wrong_type_does_not_reach_validate(setup, tmp_path):
    r = recipe(setup, "out", method="pafi")
    r["method"]["rho"] = "a lot"
    _refused(_finetune(setup, tmp_path, r), "method.rho: expected a number")


def test_max_length_beyond_model_positions(setup, tmp_path):
    r = recipe(setup, "out")
    r["data"]["max_length"] = 100  # the tiny BERT has 64 positions
    _refused(_finetune(setup, tmp_path, r), "data.max_length 100 exceeds", "at most 64")


def test_resume_path_missing(setup, tmp_path):
    r = recipe(setup, "out")
    r["train"]["resume"] = str(tmp_path / "no-such-checkpoint")
    _refused(_finetune(setup, tmp_path, r), "train.resume")


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ""])
def test_recipe_name_cannot_leave_runs_dir(setup, tmp_path, name):
    r = recipe(setup, "out")
    r["name"] = name
    _refused(_finetune(setup, tmp_path, r), "name:", "plain file name")


# ---- data ------------------------------------------------------------------------------------------

def _data_root(tmp_path, task: str, train: str | None, validation: str | None = None) -> Path:
    root = tmp_path / "data"
    (root / task).mkdir(parents=True)
    good = '{"sentence": "good movie", "label": 1}\n{"sentence": "bad movie", "label": 0}\n'
    if task == "stsb":
        good = '{"sentence1": "a", "sentence2": "b", "label": 2.5}\n'
    for split, content in (("train", train), ("validation", validation if validation is not None else good)):
        if content is not None:
            (root / task / f"{split}.jsonl").write_text(content)
    return root


@pytest.mark.parametrize("task,train,needle", [
    ("sst2", "", "holds no rows"),
    ("sst2", "\n\n", "holds no rows"),
    ("sst2", None, "no train split"),
    ("sst2", '{"text": "x", "label": 1}\n', "lacks the column(s) sentence"),
    ("sst2", '{"sentence": "x", "label": 1}\n{"sentence": "y"}\n', "row 2: lacks the column(s) label"),
    ("sst2", '{"sentence": "x", "label": 2}\n', "outside 0..1"),
    ("sst2", '{"sentence": "x", "label": -1}\n', "outside 0..1"),
    ("sst2", '{"sentence": "x", "label": 1.5}\n', "whole class index"),
    ("sst2", '{"sentence": "x", "label": "pos"}\n', "not a number"),
    ("sst2", '{"sentence": "x", "label": true}\n', "not a number"),
    ("sst2", '{"sentence": 7, "label": 1}\n', "must be text"),
    ("sst2", '[1, 2]\n', "expected an object"),
    ("sst2", '{"sentence": "x", "label": 1}\n{oops\n', "line 2: not valid JSON"),
    ("stsb", '{"sentence1": "a", "sentence2": "b", "label": NaN}\n', "finite"),
])
def test_bad_data_files(setup, tmp_path, task, train, needle):
    root = _data_root(tmp_path, task, train)
    r = recipe(setup, "out", task=task)
    r["data"]["root"] = str(root)
    _refused(_finetune(setup, tmp_path, r), needle)


def test_bad_validation_split_is_caught_before_training(setup, tmp_path):
    root = _data_root(tmp_path, "sst2", '{"sentence": "x", "label": 1}\n', validation='{"sentence": "x", "label": 5}\n')
    r = recipe(setup, "out")
    r["data"]["root"] = str(root)
    _refused(_finetune(setup, tmp_path, r), "validation.jsonl", "outside 0..1")


def test_missing_data_root(setup, tmp_path):
    r = recipe(setup, "out")
    r["data"]["root"] = str(tmp_path / "nowhere")
    _refused(_finetune(setup, tmp_path, r), "does not exist", "data.root")


# ---- output directory ------------------------------------------------------------------------------

def test_output_dir_holding_a_different_run(setup, tmp_path):
    out = Path(setup["root"]) / "other-run"
    out.mkdir()
    other = recipe(setup, "other-run")
    other["train"]["lr"] = 0.5
    (out / "config.yaml").write_text(yaml.safe_dump(other))
    (out / "metrics.json").write_text(json.dumps({"accuracy": 0.9}))
    (out / ".peftkit-run").write_text(json.dumps({"written": ["config.yaml", "metrics.json"]}))  # a run dir peftkit made
    path = write_recipe(tmp_path / "r.yaml", recipe(setup, "other-run"))
    _refused(invoke("finetune", path), "already holds a run of a different recipe", "output.overwrite=true")
    _refused(invoke("finetune", path, "train.resume=auto"), "different recipe")
    assert sorted(p.name for p in out.iterdir()) == [".peftkit-run", "config.yaml", "metrics.json"]  # untouched, lock released


def test_output_dir_under_a_regular_file(setup, tmp_path):
    """Works as root too (root ignores chmod): a directory cannot be created inside a file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = recipe(setup, "out")
    r["output"]["dir"] = str(blocker / "run")
    _refused(_finetune(setup, tmp_path, r), "cannot write to output directory", "writable output.dir")
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0555; the regular-file case covers this as root")
def test_output_dir_read_only_chmod(setup, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        r = recipe(setup, "out")
        r["output"]["dir"] = str(parent / "run")
        _refused(_finetune(setup, tmp_path, r), "cannot write to output directory")
    finally:
        parent.chmod(0o755)


# ---- quantization recipes: bits and group size that do not fit the model ---------------------------

@pytest.fixture(scope="module")
def quant_setup(tmp_path_factory):
    from helpers.tiny import tiny_llama

    root = tmp_path_factory.mktemp("quant")
    tiny_llama(hidden=64).save_pretrained(root / "llama")  # hidden 64, intermediate 128
    (root / "wiki").mkdir()
    (root / "wiki" / "wiki.valid.tokens").write_text("the cat sat on the mat . " * 200)
    return root


def _quant(quant_setup, tmp_path, **quant):
    r = {"model": {"name": str(quant_setup / "llama")}, "quant": {"method": "rtn", **quant},
         "calib": {"root": str(quant_setup / "wiki")}, "output": {"dir": str(tmp_path / "qout")}}
    result = invoke("quantize", write_recipe(tmp_path / "q.yaml", r))
    assert not (tmp_path / "qout").exists()
    return result


@pytest.mark.parametrize("quant,needle", [
    ({"bits": 5}, "quant.bits: must be one of 2, 3 or 4"),
    ({"bits": "two"}, "quant.bits: must be one of 2, 3 or 4"),
    ({"bits": 16}, "quant.bits: 16 is not a bit width peftkit quantizes to: write null"),
    ({"group_size": 48}, "quant.group_size: 48 does not divide the input width 64 of self_attn.q_proj"),
    ({"group_size": 0}, "quant.group_size: must be >= 1"),
])
def test_quant_bits_and_group_size_must_fit(quant_setup, tmp_path, quant, needle):
    _refused(_quant(quant_setup, tmp_path, **quant), needle)
