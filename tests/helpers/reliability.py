"""Shared set-up of the reliability tests: a tiny model + data, recipe files, the CLI in- and out-of-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def make_setup(root: Path) -> dict:
    """A tiny BERT classifier checkpoint and a tiny learnable sst2/stsb data root under ``root``."""
    from helpers.tiny import save_tiny_classifier, write_glue_task

    model = save_tiny_classifier(root / "tiny-bert")
    for task in ("sst2", "stsb"):
        write_glue_task(root / "glue", task, n_train=48, n_val=16)
    return {"model": model, "data": root / "glue", "root": root}


def recipe(setup: dict, out: str | Path, method: str = "full", task: str = "sst2", **train) -> dict:
    t = {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "seed": 3, "save_every": 2, "eval_every": 3,
         "log_every": 1, "threads": 1}
    t.update(train)
    return {"model": {"name": str(setup["model"])}, "data": {"task": task, "max_length": 16, "root": str(setup["data"])},
            "method": {"name": method}, "train": t, "output": {"dir": str(Path(setup["root"]) / out)}}


def write_recipe(path: Path, content: dict | str) -> str:
    path = Path(path)
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return str(path)


def cli_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "peftkit", *args]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`peftkit ARGS` in a fresh process (the real entry point, exit codes and stderr included)."""
    return subprocess.run(cli_command(*args), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def start_cli(*args: str, log: Path) -> subprocess.Popen:
    """Start `peftkit ARGS` in the background, stdout+stderr into ``log``."""
    handle = open(log, "w")
    return subprocess.Popen(cli_command(*args), cwd=REPO, env=cli_env(), stdout=handle, stderr=subprocess.STDOUT)


def invoke(*args: str):
    """`peftkit ARGS` in this process through Typer's runner: the same exit-code path, without the start-up cost."""
    from typer.testing import CliRunner

    from peftkit.cli import app

    return CliRunner().invoke(app, list(args))


def final_state(run: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted((Path(run) / "final").glob("*.safetensors"))
    assert files, f"no weights in {run}/final"
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def assert_identical(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def tree_snapshot(root: Path, mtimes: bool = False) -> dict:
    """Every entry under ``root`` (links not followed) with its mode bits and content: a file's bytes, a link's
    target; with ``mtimes`` also its modification time. Equal snapshots = an untouched tree."""
    import stat

    shot = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            st = p.lstat()
            content = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
            shot[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), content) + ((st.st_mtime_ns,) if mtimes else ())
    return shot
