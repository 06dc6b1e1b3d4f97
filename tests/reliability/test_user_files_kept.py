"""Nothing peftkit writes loses or touches a file of the user's: files saved into a run dir while it trains,
links in a run dir, result files over the input or over someone's JSON, exports racing into one folder, and
a full disk in the middle of a save."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from helpers.reliability import invoke, make_setup, recipe, tree_snapshot, write_recipe

from peftkit.errors import RunFailed, UserError
from peftkit.train.rundir import MARKER, RunDir

CONFIG = {"model": {"name": "m"}, "train": {"lr": 0.1}, "output": {"overwrite": False}}


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")  # as write(2) raises it: no file name attached


def _safetensors_disk_full():
    """What safetensors raises when the disk fills during save_file (its own exception type, not an OSError)."""
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


# ---- the run marker lists what peftkit wrote, not what the directory held ------------------------------------------

def test_a_file_saved_into_the_run_dir_while_it_runs_is_not_recorded_nor_removed_by_overwrite(tmp_path):
    run = tmp_path / "run"
    with RunDir(run, CONFIG, resume=False, overwrite=False) as d:
        (d / "train.log").write_text("step 1\n")
        (d / "my-notes.txt").write_text("written by hand while the run trained\n")  # the user's, mid-run
        (d / "my-plots").mkdir()
        (d / "my-plots" / "loss.png").write_bytes(b"\x89PNG")
    written = json.loads((run / MARKER).read_text())["written"]
    assert "my-notes.txt" not in written and "my-plots" not in written and "train.log" in written

    with RunDir(run, {**CONFIG, "train": {"lr": 0.2}}, resume=False, overwrite=True):
        assert not (run / "train.log").exists()
    assert (run / "my-notes.txt").read_text() == "written by hand while the run trained\n"
    assert (run / "my-plots" / "loss.png").read_bytes() == b"\x89PNG"


def test_names_an_older_marker_listed_from_the_directory_are_not_trusted(tmp_path):
    """Markers before version 2 listed the directory's content, a user's files included: only the run layout
    is taken from them, so an overwrite keeps the rest."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: m}\n")
    (run / "train.log").write_text("old\n")
    (run / "thesis.tex").write_text("\\chapter{1}\n")
    (run / MARKER).write_text(json.dumps({"tool": "peftkit", "written": ["config.yaml", "train.log", "thesis.tex"]}))
    with RunDir(run, CONFIG, resume=False, overwrite=True):
        pass
    assert (run / "thesis.tex").read_text() == "\\chapter{1}\n" and not (run / "train.log").exists()
    assert "thesis.tex" not in json.loads((run / MARKER).read_text())["written"]


def test_finetune_overwrite_keeps_a_file_saved_into_the_run_dir_during_training(setup, tmp_path, monkeypatch):
    """The real pipeline: a file appears in the run dir at a checkpoint; a later overwrite run leaves it."""
    from peftkit.train.trainer import Trainer

    path = write_recipe(tmp_path / "r.yaml", recipe(setup, "kept", max_steps=2, eval_every=None, save_every=1))
    run = Path(setup["root"]) / "kept"
    original = Trainer.save_checkpoint

    def save_checkpoint(self):
        (self.run_dir / "analysis.ipynb").write_text('{"cells": []}')  # the user saves a notebook meanwhile
        return original(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_checkpoint)
    assert invoke("finetune", path).exit_code == 0
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    assert "analysis.ipynb" not in json.loads((run / MARKER).read_text())["written"]
    result = invoke("finetune", path, "output.overwrite=true")
    assert result.exit_code == 0, result.output
    assert (run / "analysis.ipynb").read_text() == '{"cells": []}'


# ---- links in a run directory ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["env.json", "train.log", "metrics.jsonl", "config.yaml", ".lock", MARKER,
                                  "checkpoints"])
def test_a_link_in_a_run_dir_is_refused_before_anything_is_written(tmp_path, name):
    run = tmp_path / "run"
    with RunDir(run, CONFIG, resume=False, overwrite=False) as d:
        for file in ("env.json", "train.log", "metrics.jsonl"):
            (d / file).write_text("{}\n")
        (d / "checkpoints").mkdir()
    theirs = tmp_path / "users"
    theirs.mkdir()
    (theirs / "precious.txt").write_text("the user's\n")
    target = theirs if name == "checkpoints" else theirs / "precious.txt"
    if os.path.lexists(run / name):
        os.replace(run / name, tmp_path / f"aside-{name}")  # keep a marker readable when the marker is linked
        if name == MARKER:
            (theirs / "precious.txt").write_text((tmp_path / f"aside-{name}").read_text())
    os.symlink(target, run / name)
    before, users = tree_snapshot(run), tree_snapshot(theirs)
    for resume, overwrite in ((True, False), (False, True)):
        with pytest.raises(UserError, match="symbolic link") as e:
            with RunDir(run, CONFIG, resume=resume, overwrite=overwrite):
                pass
        assert str(run / name) in str(e.value) and "Remove the link" in str(e.value)
        assert tree_snapshot(run) == before and tree_snapshot(theirs) == users


def test_resume_through_a_linked_log_is_exit_2_and_the_linked_file_untouched(setup, tmp_path):
    """The CLI: a run dir whose train.log is a link to a file of the user's; resume is refused, nothing written."""
    path = write_recipe(tmp_path / "r.yaml", recipe(setup, "linked", max_steps=2, eval_every=None))
    assert invoke("finetune", path).exit_code == 0
    run = Path(setup["root"]) / "linked"
    mine = tmp_path / "diary.txt"
    mine.write_text("dear diary\n")
    (run / "train.log").unlink()
    os.symlink(mine, run / "train.log")
    before = tree_snapshot(run)
    result = invoke("finetune", path, "train.resume=auto")
    assert result.exit_code == 2, result.output
    assert "symbolic link" in result.output and "train.log" in result.output and "Traceback" not in result.output
    assert mine.read_text() == "dear diary\n" and tree_snapshot(run) == before


def test_the_writers_themselves_never_follow_a_link(tmp_path):
    """Defence in depth below the run-dir check: whole-file writes and appends refuse a link at the target."""
    from peftkit.utils.atomic import atomic_write_text, open_append

    mine = tmp_path / "mine.txt"
    mine.write_text("mine\n")
    os.symlink(mine, tmp_path / "link")
    with pytest.raises(UserError, match="symbolic link"):
        atomic_write_text(tmp_path / "link", "peftkit's\n")
    with pytest.raises(UserError, match="symbolic link"):
        open_append(tmp_path / "link")
    assert mine.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["link", "mine.txt"]


# ---- result files ----------------------------------------------------------------------------------------------------

def _rows(path: Path) -> Path:
    path.write_text('{"sentence": "a good movie", "label": 1}\n{"sentence": "a bad movie", "label": 0}\n')
    return path


@pytest.mark.parametrize("how", ["same path", "symlink", "hardlink"])
def test_predict_never_writes_over_its_input(tmp_path, how):
    from peftkit.commands.predict import predict

    rows = _rows(tmp_path / "rows.jsonl")
    out = rows if how == "same path" else tmp_path / "out.jsonl"
    if how == "symlink":
        os.symlink(rows, out)
    elif how == "hardlink":
        os.link(rows, out)
    before = rows.read_bytes()
    with pytest.raises(UserError, match="is the input file|symbolic link"):
        predict(str(tmp_path / "no-run-needed"), str(rows), str(out))  # refused before any model loads
    assert rows.read_bytes() == before


def test_predictions_replace_only_predictions(tmp_path):
    from peftkit.commands.predict import check_jsonl_output, write_jsonl

    out = tmp_path / "p.jsonl"
    write_jsonl([{"label": "positive", "probabilities": {"negative": 0.1, "positive": 0.9}}], out)
    assert check_jsonl_output(str(out)) == out  # an earlier prediction of peftkit's may be replaced
    write_jsonl([{"value": 2.5}], out)
    assert json.loads(out.read_text()) == {"value": 2.5}
    theirs = _rows(tmp_path / "labeled.jsonl")  # JSON lines, but the user's rows, not predictions
    before = theirs.read_bytes()
    with pytest.raises(UserError, match="not a JSON-lines result file peftkit wrote"):
        check_jsonl_output(str(theirs))
    with pytest.raises(UserError, match="not a file peftkit wrote"):  # and at write time, should it appear meanwhile
        write_jsonl([{"value": 1.0}], theirs)
    assert theirs.read_bytes() == before


def test_eval_json_never_replaces_a_json_file_of_the_users(tmp_path):
    from peftkit.commands.evaluate import write_results
    from peftkit.utils.output_paths import check_output_file

    theirs = tmp_path / "settings.json"
    theirs.write_text('{"theme": "dark", "accuracy": 0.5}\n')
    with pytest.raises(UserError, match="not a JSON result file peftkit wrote"):
        check_output_file(theirs, "--json")
    with pytest.raises(UserError, match="not a file peftkit wrote"):
        write_results({"bench": "glue-eval", "rows": []}, [], str(theirs))
    assert theirs.read_text() == '{"theme": "dark", "accuracy": 0.5}\n'

    ours = tmp_path / "results.json"
    write_results({"bench": "glue-eval", "rows": [{"accuracy": 0.5}]}, [], str(ours))
    assert json.loads(ours.read_text())["written_by"] == "peftkit"
    assert check_output_file(ours, "--json") == ours
    write_results({"bench": "glue-eval", "rows": [{"accuracy": 0.75}]}, [], str(ours))
    assert json.loads(ours.read_text())["rows"] == [{"accuracy": 0.75}]
    legacy = tmp_path / "legacy.json"  # a result written before results carried written_by
    legacy.write_text(json.dumps({"bench": "glue-eval", "machine": {}, "rows": []}))
    assert check_output_file(legacy, "--json") == legacy


def test_eval_on_own_rows_never_writes_over_them(tmp_path):
    from peftkit.commands.evaluate import evaluate

    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps({"bench": "x", "rows": []}))  # even rows shaped like a result of peftkit's
    with pytest.raises(UserError, match="is the input file"):
        evaluate(str(rows), [str(tmp_path / "run")], json_path=str(rows))


# ---- export -------------------------------------------------------------------------------------------------------

def _fake_export(source, out, merge, command, shown_as=None):
    (out / "model.safetensors").write_bytes(b"weights")
    return {"method": "lora", "export": {"format": "peft"}}


def test_export_to_a_link_is_refused(tmp_path):
    from peftkit.commands.export import export

    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "empty").mkdir()
    os.symlink(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(UserError, match="symbolic link"):
        export(str(run), str(tmp_path / "out"))
    assert os.listdir(tmp_path / "empty") == [] and (tmp_path / "out").is_symlink()


def test_an_export_racing_another_into_one_new_folder_is_refused_and_leaves_the_others(tmp_path, monkeypatch):
    """While this export is written, another process creates --out (and fills it): exit 2, its files kept,
    this export's temp dir removed."""
    import peftkit.artifacts.card as artifacts_card
    import peftkit.artifacts.export as artifacts_export
    from peftkit.commands.export import export

    run, out = tmp_path / "run", tmp_path / "exports" / "x"
    run.mkdir()

    def racing(source, tmp, merge, command, shown_as=None):
        result = _fake_export(source, tmp, merge, command, shown_as)
        out.mkdir(parents=True)
        (out / "theirs.bin").write_bytes(b"the other export")
        return result

    monkeypatch.setattr(artifacts_export, "write_export", racing)
    monkeypatch.setattr(artifacts_card, "size_rows", lambda target, exported: [])
    with pytest.raises(UserError, match="another process created it"):
        export(str(run), str(out))
    assert sorted(os.listdir(out.parent)) == ["x"] and os.listdir(out) == ["theirs.bin"]

    monkeypatch.setattr(artifacts_export, "write_export", _fake_export)  # and an undisturbed export appears whole
    export(str(run), str(tmp_path / "exports" / "y"))
    assert sorted(os.listdir(tmp_path / "exports" / "y")) == [MARKER, "model.safetensors"]


def test_disk_full_during_an_export_is_a_run_failure_with_nothing_left(tmp_path, monkeypatch):
    import peftkit.artifacts.export as artifacts_export
    from peftkit.commands.export import export

    run, out = tmp_path / "run", tmp_path / "exports" / "x"
    run.mkdir()

    def full(source, tmp, merge, command, shown_as=None):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise _safetensors_disk_full()

    monkeypatch.setattr(artifacts_export, "write_export", full)
    with pytest.raises(RunFailed, match="could not write the export .*No space left on device"):
        export(str(run), str(out))
    assert os.listdir(out.parent) == []


# ---- a full disk in the libraries' own words ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("kept"))


def test_disk_full_in_safetensors_words_during_a_checkpoint_is_exit_1(setup, tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError, not OSError: still exit 1 naming the checkpoint."""
    import safetensors.torch

    from peftkit.train.checkpoint import step_checkpoints

    path = write_recipe(tmp_path / "r.yaml", recipe(setup, "st-full", eval_every=None, max_steps=4))
    original, calls = safetensors.torch.save_file, {"n": 0}

    def save_file(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _safetensors_disk_full()
        return original(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    result = invoke("finetune", path)
    assert result.exit_code == 1 and not isinstance(result.exception, Exception), result.output  # no traceback
    assert "could not write checkpoint" in result.output and "No space left on device" in result.output
    run = Path(setup["root"]) / "st-full"
    assert [p.name for p in step_checkpoints(run / "checkpoints")] == ["step-000002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_disk_full_in_torch_save_during_a_checkpoint_is_exit_1(tmp_path, monkeypatch):
    """torch.save reports the failed write of a full disk as 'RuntimeError: ... unexpected pos 704 vs 598'
    (seen on a full tmpfs): the checkpoint writer recovers the OSError behind it, so the run fails with the
    cause, older checkpoints intact."""
    import builtins

    import torch

    from peftkit.train import checkpoint

    checkpoint.write_checkpoint(tmp_path / "step-000001", {"w": torch.ones(2)}, {"x": torch.zeros(3)}, {"step": 1})

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise _disk_full()

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        return FullFile(f) if str(file).endswith("optimizer.pt") and "w" in mode else f

    def torch_save_on_a_full_disk(obj, f, *args, **kwargs):  # what torch's C++ writer does when a write fails
        target = builtins.open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        try:
            target.write(b"PK\x03\x04")
        except OSError:
            pass
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint, "open", full_open, raising=False)
    monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    with pytest.raises(RunFailed, match="could not write checkpoint .*step-000002: No space left on device"):
        checkpoint.write_checkpoint(tmp_path / "step-000002", {"w": torch.ones(2)}, {"x": torch.zeros(3)},
                                    {"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["step-000001"]
    checkpoint.read_checkpoint(tmp_path / "step-000001")


def test_disk_full_in_safetensors_words_during_the_final_save_is_a_run_failure(tmp_path):
    from peftkit.train.pipeline import write_final

    run = tmp_path / "run"
    run.mkdir()

    def save(directory):
        (directory / "model.safetensors").write_bytes(b"half")
        raise _safetensors_disk_full()

    with pytest.raises(RunFailed, match="could not save the final model .*No space left on device"):
        write_final(save, run)
    assert os.listdir(run) == []


def test_disk_full_in_a_librarys_words_anywhere_in_a_run_is_a_run_failure(setup):
    """Whatever a command saves inside its run (a quantize run's model, say): a full disk reported as a
    library's own exception ends as exit 1 with the cause; other errors pass unchanged."""
    from peftkit.config.loader import load_recipe
    from peftkit.train.pipeline import open_run

    run_recipe = load_recipe(recipe(setup, "lib-full"))
    with pytest.raises(RunFailed, match="cannot write into .*lib-full: No space left on device"):
        with open_run(run_recipe):
            raise _safetensors_disk_full()
    with pytest.raises(ValueError, match="not about the disk"):
        with open_run(run_recipe, resume=True):
            raise ValueError("not about the disk (os error 2)")


def test_eval_results_in_a_run_dir_are_recorded_as_peftkits(tmp_path):
    """`peftkit eval` writes eval/ into a run directory: the marker lists it, so an overwrite removes it."""
    from peftkit.commands.evaluate import write_results

    run = tmp_path / "run"
    with RunDir(run, CONFIG, resume=False, overwrite=False):
        (run / "final").mkdir()
    write_results({"bench": "glue-eval", "rows": []}, [str(run)], None)
    assert "eval" in json.loads((run / MARKER).read_text())["written"]
    (result,) = (run / "eval").iterdir()
    assert json.loads(result.read_text())["written_by"] == "peftkit"
    with RunDir(run, CONFIG, resume=False, overwrite=True):
        assert not (run / "eval").exists()
