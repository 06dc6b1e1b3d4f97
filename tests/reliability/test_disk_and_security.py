"""Disk full (simulated) during a checkpoint and during the final save; what the toolkit may load and run."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
from helpers.reliability import (
    assert_identical,
    final_state,
    invoke,
    make_setup,
    recipe,
    write_recipe,
)

from peftkit.errors import UserError

PEFTKIT = Path(__file__).resolve().parents[2] / "peftkit"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("disk"))


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")  # as write(2) raises it: no file name attached


def test_disk_full_during_a_checkpoint(setup, tmp_path, monkeypatch):
    """The step-6 checkpoint write fails: exit 1, a message naming the checkpoint, older checkpoints intact, resumable."""
    import safetensors.torch

    from peftkit.train.checkpoint import read_checkpoint, step_checkpoints

    path = write_recipe(tmp_path / "r.yaml", recipe(setup, "full-disk", eval_every=None))
    run = Path(setup["root"]) / "full-disk"
    original, calls = safetensors.torch.save_file, {"n": 0}

    def save_file(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # step-2, step-4, best (eval at step 6), step-6: the last one fails
            raise _disk_full()
        return original(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    result = invoke("finetune", path)
    assert result.exit_code == 1, result.output
    assert "could not write checkpoint" in result.output and "step-000006" in result.output
    assert "No space left on device" in result.output and "train.resume=auto" in result.output
    assert "Traceback" not in result.output
    assert [p.name for p in step_checkpoints(run / "checkpoints")] == ["step-000002", "step-000004"]
    read_checkpoint(run / "checkpoints" / "step-000004")
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / ".lock").exists()

    monkeypatch.setattr(safetensors.torch, "save_file", original)  # space freed: the run continues and finishes
    assert invoke("finetune", path, "train.resume=auto").exit_code == 0
    from peftkit.commands.train import finetune

    reference = finetune(write_recipe(tmp_path / "ref.yaml", recipe(setup, "full-disk-ref", eval_every=None)), [])
    assert_identical(final_state(reference), final_state(run))


def test_disk_full_during_the_final_save(setup, tmp_path, monkeypatch):
    from peftkit.config.run_info import INFO_FILE

    path = write_recipe(tmp_path / "r.yaml", recipe(setup, "full-final"))
    run = Path(setup["root"]) / "full-final"
    original = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == INFO_FILE:
            raise _disk_full()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    result = invoke("finetune", path)
    assert result.exit_code == 1, result.output
    assert "could not save the final model" in result.output and "No space left on device" in result.output
    assert not (run / "final").exists() and not list(run.glob(".final-*"))
    monkeypatch.setattr(Path, "write_text", original)
    assert invoke("finetune", path, "train.resume=auto").exit_code == 0
    assert (run / "final" / INFO_FILE).is_file()


def test_disk_full_elsewhere_is_exit_1_with_a_message(setup, tmp_path, monkeypatch):
    """Any ENOSPC (here: writing the run's env.json) ends as one message and exit 1, never a traceback."""
    from peftkit.utils import atomic

    path = write_recipe(tmp_path / "r.yaml", recipe(setup, "full-env"))
    original = atomic._write_file  # every file peftkit writes whole goes through it

    def write_file(fd, tmp, data, fsync):
        if tmp.name.startswith(".env.json.tmp-"):
            os.close(fd)
            raise _disk_full()
        return original(fd, tmp, data, fsync)

    monkeypatch.setattr(atomic, "_write_file", write_file)
    result = invoke("finetune", path)
    assert result.exit_code == 1 and "No space left on device" in result.output and "env.json" in result.output


def _sources() -> dict[Path, str]:
    return {p: p.read_text() for p in PEFTKIT.rglob("*.py")}


def test_weights_load_only_through_safe_paths():
    """torch.load always with weights_only=True; no pickle; no trust_remote_code=True anywhere."""
    for path, text in _sources().items():
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "import pickle" not in text and "pickle.load" not in text, path
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path


def test_trust_remote_code_is_off_unless_the_recipe_says_so(setup, tmp_path, monkeypatch):
    import transformers

    from peftkit.config.loader import load_recipe

    assert load_recipe(recipe(setup, "x")).model.trust_remote_code is False
    seen = []
    for cls in (transformers.AutoModelForSequenceClassification, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    result = invoke("finetune", write_recipe(tmp_path / "r.yaml", recipe(setup, "trust", max_steps=1)))
    assert result.exit_code == 0, result.output
    assert seen == [False, False]


def test_a_run_writes_only_under_its_output_dir(setup, tmp_path, monkeypatch):
    """Every file a run creates lies under output.dir (none in the working directory, none beside the run)."""
    monkeypatch.chdir(tmp_path)
    recipe_file = Path(setup["root"]) / "contained.yaml"
    before = set(Path(setup["root"]).rglob("*"))
    r = recipe(setup, "contained", method="lora", max_steps=2)
    r["name"] = "contained-run"
    result = invoke("finetune", write_recipe(recipe_file, r))
    assert result.exit_code == 0, result.output
    run = Path(setup["root"]) / "contained"
    created = set(Path(setup["root"]).rglob("*")) - before - {recipe_file, run}
    assert created and all(run in p.parents for p in created), sorted(map(str, created))
    assert list(tmp_path.iterdir()) == []


def test_data_split_name_cannot_escape_the_data_root(setup, tmp_path):
    """data.train_split is joined to the data root: a split with '..' is refused before it is read."""
    r = recipe(setup, "out")
    r["data"]["train_split"] = "../../stsb/train"
    r["data"]["eval_split"] = "/etc/passwd"
    result = invoke("finetune", write_recipe(tmp_path / "r.yaml", r))
    assert result.exit_code == 2 and "data.train_split" in result.output and "data.eval_split" in result.output, result.output


def test_a_run_dir_cannot_switch_on_remote_code(setup, tmp_path, monkeypatch):
    """A run directory whose peftkit.json says trust_remote_code: true loads with False unless the caller says so."""
    import json

    import transformers

    from peftkit.artifacts.load import load_run

    result = invoke("finetune", write_recipe(tmp_path / "r.yaml", recipe(setup, "handed", max_steps=1)))
    assert result.exit_code == 0, result.output
    info_path = Path(setup["root"]) / "handed" / "final" / "peftkit.json"
    info = json.loads(info_path.read_text())
    info["model"]["trust_remote_code"] = True  # what a hostile run directory would carry
    info_path.write_text(json.dumps(info))
    seen = []
    original = transformers.AutoModelForSequenceClassification.from_pretrained.__func__

    def spy(klass, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(klass, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", classmethod(spy))
    load_run(Path(setup["root"]) / "handed")
    assert seen == [False]
    load_run(Path(setup["root"]) / "handed", trust_remote_code=True)
    assert seen == [False, True]


def test_malformed_run_metadata_is_one_clear_error(setup, tmp_path):
    from peftkit.artifacts.load import load_run

    result = invoke("finetune", write_recipe(tmp_path / "r.yaml", recipe(setup, "meta", max_steps=1)))
    assert result.exit_code == 0, result.output
    info_path = Path(setup["root"]) / "meta" / "final" / "peftkit.json"
    for text, needle in (("{not json", "cannot be read as JSON"), ("[1, 2]", "is not peftkit run metadata"),
                         ('{"method": "nope", "options": {}, "model": {}}', "names the method 'nope'"),
                         ('{"method": "lora", "options": {}, "model": {"task_head": "x"}}', "model section is not valid")):
        info_path.write_text(text)
        with pytest.raises(UserError, match=needle):
            load_run(Path(setup["root"]) / "meta")
