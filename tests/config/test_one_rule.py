"""One rule per option: the same training option is refused with the same words in a fine-tuning recipe, a
pretraining recipe and a bench's --set, because all three are checked by TrainArgs' own declaration."""

import subprocess
import sys

import pytest

from peftkit.config.loader import load_recipe, load_settings
from peftkit.errors import UserError


@pytest.fixture
def pretrain_dict(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat\n" * 50)
    return {"model": {"preset": "tiny"}, "data": {"files": [str(corpus)], "eval_files": []}}


def _message(fn) -> str:
    with pytest.raises(UserError) as e:
        fn()
    return str(e.value)


@pytest.mark.parametrize("setting, key, value, words", [
    ("lr", "lr", "-1", "must be > 0 and <= 10, got -1"),
    ("lr", "lr", "1e-3x", "expected a number"),
    ("batch_size", "batch_size", "0", "must be >= 1 and <= 65536, got 0"),
    ("seed", "seed", "99999999999", "must be >= 0 and <= 4294967295"),
    ("weight_decay", "weight_decay", "nan", "must be a finite number"),
])
def test_the_same_bad_value_is_refused_alike_everywhere(pretrain_dict, setting, key, value, words):
    from peftkit.bench.glue import GlueSettings
    from peftkit.bench.peers import PeersSettings

    finetune = _message(lambda: load_recipe({}, [f"train.{key}={value}"], kind="finetune"))
    pretrain = _message(lambda: load_recipe(pretrain_dict, [f"train.{key}={value}"], kind="pretrain"))
    bench_cls = PeersSettings if setting in PeersSettings.model_fields else GlueSettings
    bench = _message(lambda: load_settings(bench_cls, [f"{setting}={value}"], "bench"))
    assert f"train.{key}: {words}" in finetune
    assert f"train.{key}: {words}" in pretrain
    assert f"{setting}: {words}" in bench


def test_numbers_in_exponent_form_are_numbers():
    recipe = load_recipe({"train": {"lr": "3e-4"}}, ["train.weight_decay=1e-2"], kind="finetune")
    assert recipe.train.lr == pytest.approx(3e-4) and recipe.train.weight_decay == pytest.approx(1e-2)


@pytest.mark.subprocess
def test_a_misspelled_bench_setting_exits_2_with_a_suggestion():
    result = subprocess.run([sys.executable, "-m", "peftkit", "bench", "peers", "--set", "lrr=1e-3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert 'lrr: unknown option (did you mean "lr"?)' in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bench_value_is_typed_before_the_bench_sees_it():
    from peftkit.bench.peers import PeersSettings

    settings = load_settings(PeersSettings, ["lr=1e-3", "skip=loftq,sparse"], "bench peers")
    assert settings.given() == {"lr": 1e-3, "skip": ["loftq", "sparse"]}


@pytest.mark.subprocess
def test_a_bench_runs_from_the_command_line_with_typed_settings(tmp_path):
    """The whole path: --set items validated, handed to the bench as plain values, the JSON written."""
    import json

    out = tmp_path / "flops.json"
    result = subprocess.run([sys.executable, "-m", "peftkit", "bench", "flops", "--quick", "--set", "shapes=tiny",
                             "--set", "timing=false", "--set", "seq_len=32", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["bench"] == "flops" and {r["shape"] for r in payload["rows"]} == {"tiny"}
    assert all(r["seq_len"] == 32 for r in payload["rows"])
