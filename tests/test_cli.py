"""The command line as a user meets it: fast help, clear errors with exit code 2, no tracebacks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[1]


def peftkit(*args, cwd=None, env=None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd or ROOT, env=e)


def test_help_lists_every_command_without_importing_torch():
    out = peftkit("--help")
    assert out.returncode == 0
    for command in ("quantize", "finetune", "pretrain", "eval", "bench", "recipes", "methods", "env"):
        assert command in out.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys; from peftkit.cli import app; "
                            "print(any(m in sys.modules for m in ('torch', 'transformers', 'peft')))"],
                           capture_output=True, text=True, cwd=ROOT)
    assert probe.stdout.strip() == "False"


def test_misspelled_key_exits_2_with_path_and_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: minilm-l6}\ntrain: {lerning_rate: 1e-3, epochs: 1}\nmethod: {name: lora}\n")
    out = peftkit("finetune", str(bad), "output.dir=" + str(tmp_path / "run"))
    assert out.returncode == 2
    assert "train.lerning_rate" in out.stderr and "did you mean" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,needle", [
    (["finetune", "no-such-recipe.yaml"], "neither a file nor a recipe name"),
    (["eval", "--task", "glue:sst3", "--model", "x"], "does not exist"),
    (["eval", "--task", "squad", "--model", "."], "unknown task suite"),
    (["bench", "latncy"], 'did you mean "latency"'),
])
def test_bad_usage_is_one_paragraph_and_exit_2(args, needle):
    out = peftkit(*args)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr


def test_missing_data_root_fails_fast_naming_what_to_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PEFTKIT_DATA_DIR"}
    out = subprocess.run([sys.executable, "-m", "peftkit", "finetune", "demo-lora-minilm-sst2", f"output.dir={tmp_path / 'r'}"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env={**env, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "PEFTKIT_DATA_DIR" in out.stderr


def test_methods_and_recipes_commands():
    out = peftkit("methods")
    assert out.returncode == 0 and "lora" in out.stdout and "bitfit" in out.stdout
    out = peftkit("recipes", "list")
    assert out.returncode == 0 and "demo-lora-minilm-sst2" in out.stdout
    out = peftkit("recipes", "show", "demo-lora-minilm-sst2", "train.lr=0.01")
    assert out.returncode == 0 and "lr: 0.01" in out.stdout


def test_finetune_then_eval_table(tiny_run_setup, tmp_path):
    import json

    import yaml

    recipe = tiny_run_setup("lora", out="cli-run", max_steps=4)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert peftkit("finetune", str(path)).returncode == 0
    out = peftkit("eval", "--task", "glue:sst2", "--model", str(tmp_path / "cli-run"), "--json", str(tmp_path / "e.json"))
    assert out.returncode == 0, out.stderr
    assert "sst2" in out.stdout and "accuracy" in out.stdout and "average" in out.stdout
    payload = json.loads((tmp_path / "e.json").read_text())
    metrics = json.loads((tmp_path / "cli-run" / "metrics.json").read_text())
    assert payload["rows"][0]["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-4)
    assert list((tmp_path / "cli-run" / "eval").glob("results-*.json"))


@pytest.mark.parametrize("args", [["--limit", "-5"], ["--batch-size", "0"], ["--seq-len", "1"]])
def test_eval_refuses_impossible_counts(args):
    result = peftkit("eval", "--task", "glue:sst2", "--model", "runs/none", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
