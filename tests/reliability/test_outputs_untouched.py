"""Output directories are peftkit's or untouched: a user's folder survives every way a run may use it."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from helpers.reliability import make_setup, recipe, run_cli, tree_snapshot, write_recipe

from peftkit.errors import UserError
from peftkit.train.rundir import MARKER, RunDir
from peftkit.utils.output_paths import (
    check_output_file,
    resolve_output_dir,
    unique_result_path,
)

CONFIG = {"model": {"name": "m"}, "train": {"lr": 0.1}, "output": {"overwrite": False}}


def _user_folder(path: Path) -> Path:
    """A folder of someone's own: files at the top (some with run-like names), a hidden file, a sub-folder."""
    (path / "thesis" / "figures").mkdir(parents=True)
    (path / "notes.txt").write_text("do not lose me\n")
    (path / "config.yaml").write_text("mine: true\n")  # the same name a run writes
    (path / ".hidden").write_bytes(os.urandom(64))
    (path / "thesis" / "figures" / "plot.png").write_bytes(os.urandom(256))
    os.chmod(path / "notes.txt", 0o640)
    return path


_snapshot = tree_snapshot  # every entry with its bytes and mode bits: equal snapshots = byte-identical trees


@pytest.mark.parametrize("resume, overwrite", [(False, False), (False, True), (True, False), (True, True)])
def test_a_users_folder_is_refused_and_left_byte_identical(tmp_path, resume, overwrite):
    folder = _user_folder(tmp_path / "mine")
    before = _snapshot(folder)
    with pytest.raises(UserError, match="holds files peftkit did not write") as e:
        with RunDir(folder, CONFIG, resume=resume, overwrite=overwrite):
            pass
    assert "never deletes files of yours" in str(e.value) and "notes.txt" in str(e.value)
    assert _snapshot(folder) == before  # nothing added (no lock, no marker), nothing changed or removed


def test_overwrite_removes_only_what_peftkit_wrote(tmp_path):
    run = tmp_path / "run"
    with RunDir(run, CONFIG, resume=False, overwrite=False, outputs=("summary.csv",)) as d:
        (d / "checkpoints" / "step-000002").mkdir(parents=True)
        (d / "train.log").write_text("log\n")
        (d / "summary.csv").write_text("a,b\n")  # a file the command declared it writes beyond the usual layout
    marker = json.loads((run / MARKER).read_text())
    assert {"config.yaml", "train.log", "checkpoints", "summary.csv"} <= set(marker["written"])

    (run / "my-analysis.ipynb").write_text("{}")  # the user adds a file of their own to the run dir
    (run / "my-data").mkdir()
    (run / "my-data" / "x.bin").write_bytes(b"\x00\x01")
    theirs = {n: _snapshot(run).get(n) for n in ("my-analysis.ipynb", "my-data", "my-data/x.bin")}

    with RunDir(run, {**CONFIG, "train": {"lr": 0.2}}, resume=False, overwrite=True) as d:
        assert not (d / "checkpoints").exists() and not (d / "train.log").exists() and not (d / "summary.csv").exists()
        assert {n: _snapshot(run).get(n) for n in theirs} == theirs
    assert {n: _snapshot(run).get(n) for n in theirs} == theirs
    assert "my-analysis.ipynb" not in json.loads((run / MARKER).read_text())["written"]
    # a marked run dir with a file of the user's is still the run's: a plain second run is refused as before
    with pytest.raises(UserError, match="already holds a run of a different recipe"):
        with RunDir(run, CONFIG, resume=False, overwrite=False):
            pass


def test_empty_and_new_dirs_are_taken_and_marked(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        with RunDir(path, CONFIG, resume=False, overwrite=False) as d:
            assert json.loads((d / MARKER).read_text())["tool"] == "peftkit"
        assert (path / "config.yaml").is_file() and not (path / ".lock").exists()


def test_a_run_dir_written_before_marking_is_still_resumable(tmp_path):
    run = tmp_path / "old-run"
    run.mkdir()
    import yaml

    (run / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    (run / "env.json").write_text("{}")
    (run / "train.log").write_text("step 1\n")
    (run / "checkpoints").mkdir()
    with RunDir(run, CONFIG, resume=True, overwrite=False):
        pass
    assert (run / MARKER).is_file() and (run / "train.log").read_text() == "step 1\n"


@pytest.mark.parametrize("spelled", [".", "~", "$HOME", "/", "..", "repo", "repo/sub/..", "$REPO_ROOT"])
def test_dangerous_output_dirs_are_refused(tmp_path, monkeypatch, spelled):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "sub" / "work").mkdir(parents=True)
    monkeypatch.chdir(repo / "sub" / "work")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("REPO_ROOT", str(repo))
    text = str(repo / spelled[len("repo"):].lstrip("/")) if spelled.startswith("repo") else spelled
    before = _snapshot(repo)
    with pytest.raises(UserError, match="cannot be an output directory"):
        resolve_output_dir(text)
    with pytest.raises(UserError, match="cannot be an output directory"):
        with RunDir(Path(os.path.expanduser(os.path.expandvars(text))), CONFIG, resume=False, overwrite=True):
            pass
    assert _snapshot(repo) == before


def test_output_dir_expands_home_and_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RUNS", str(tmp_path / "runs"))
    assert resolve_output_dir("~/runs/a") == tmp_path / "home" / "runs" / "a"
    assert resolve_output_dir("$RUNS/b") == resolve_output_dir("${RUNS}/b") == tmp_path / "runs" / "b"
    monkeypatch.delenv("PEFTKIT_SURELY_UNSET", raising=False)
    with pytest.raises(UserError, match=r"\$PEFTKIT_SURELY_UNSET, which is not set"):
        resolve_output_dir("$PEFTKIT_SURELY_UNSET/run")
    with pytest.raises(UserError, match="is empty"):
        resolve_output_dir("  ")


def test_result_files_are_checked_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "results").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        check_output_file(tmp_path / "results")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        check_output_file(tmp_path / "a-file" / "deeper" / "r.json")
    essay = tmp_path / "essay.json"
    essay.write_text("Chapter 1\n")  # not JSON: not a result peftkit wrote
    with pytest.raises(UserError, match="not a JSON result file"):
        check_output_file(essay)
    assert essay.read_text() == "Chapter 1\n"
    (tmp_path / "old.json").write_text('{"written_by": "peftkit", "accuracy": 0.5}')
    assert check_output_file("~/old.json") == tmp_path / "old.json"  # a previous result may be replaced
    assert check_output_file("~/new/dir/r.json") == tmp_path / "new" / "dir" / "r.json"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_results_finishing_in_the_same_second_keep_both_files(tmp_path):
    stem = "eval-sst2-20250101-120000"
    got: list[Path] = []
    threads = [threading.Thread(target=lambda: got.append(unique_result_path(tmp_path, stem))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8 and all(p.is_file() for p in got)
    assert tmp_path / f"{stem}.json" in got and tmp_path / f"{stem}-2.json" in got


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("untouched"))


@pytest.mark.subprocess
def test_finetune_on_a_users_folder_with_overwrite_leaves_it_byte_identical(setup):
    """The real CLI in a fresh process: refused with exit 2 before any training, the folder as it was."""
    folder = _user_folder(Path(setup["root"]) / "my-project")
    before = _snapshot(folder)
    path = write_recipe(Path(setup["root"]) / "into-mine.yaml", recipe(setup, "my-project", max_steps=2))
    result = run_cli("finetune", path, "output.overwrite=true")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "holds files peftkit did not write" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert _snapshot(folder) == before
