"""SIGKILL at a random moment, then train.resume=auto: the final weights equal an uninterrupted run's, bit for bit.

The run is the real `peftkit finetune` in a subprocess, checkpointing every step (save_every=1) so that the
kill lands at an arbitrary point: inside a step, inside a checkpoint write, between the renames of the
`best` checkpoint. Whatever it hits, the latest complete checkpoint must load and the resumed run must
reproduce the uninterrupted one exactly (CPU, fp32, one thread).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from helpers.reliability import (
    assert_identical,
    final_state,
    make_setup,
    recipe,
    start_cli,
    write_recipe,
)

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

STEPS = 40
TRAIN = {"max_steps": STEPS, "save_every": 1, "eval_every": 5, "keep_last": 2, "log_every": 10}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference run (in-process: the same code as the CLI, one thread)."""
    from peftkit.commands.train import finetune

    setup = make_setup(tmp_path_factory.mktemp("kill"))
    path = write_recipe(Path(setup["root"]) / "straight.yaml", recipe(setup, "straight", **TRAIN))
    return setup, final_state(finetune(path, []))


def wait_for_checkpoint(run: Path, proc, step: int, timeout: float = 120) -> None:
    """Wait until the checkpoint of ``step`` (or a later one) is complete."""
    from peftkit.train.checkpoint import step_checkpoints

    deadline = time.monotonic() + timeout
    while not [p for p in step_checkpoints(run / "checkpoints") if int(p.name.split("-")[1]) >= step]:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_moment_then_resume_is_bit_identical(straight, seed):
    from peftkit.train.checkpoint import read_checkpoint, step_checkpoints

    setup, reference = straight
    run = Path(setup["root"]) / f"killed-{seed}"
    path = write_recipe(Path(setup["root"]) / f"killed-{seed}.yaml", recipe(setup, f"killed-{seed}", **TRAIN))
    proc = start_cli("finetune", path, log=Path(setup["root"]) / f"killed-{seed}.log")
    try:
        rng = random.Random(seed)
        wait_for_checkpoint(run, proc, rng.randint(1, STEPS - 12))
        time.sleep(rng.uniform(0.0, 0.1))  # a random point inside the next step(s): forward, write, rename
        assert proc.poll() is None, "the run finished before the kill; make it longer"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert not (run / "final").exists()
    latest = step_checkpoints(run / "checkpoints")[-1]
    killed_at = int(latest.name.split("-")[1])
    assert 1 <= killed_at < STEPS
    print(f"seed {seed}: killed after step {killed_at}")
    read_checkpoint(latest)  # the last complete checkpoint verifies (sizes and sha256) and loads

    from peftkit.commands.train import finetune

    finetune(path, ["train.resume=auto"])  # in-process to save a start-up; the signal tests resume through the CLI
    assert f"resumed from {latest}" in (run / "train.log").read_text()
    assert_identical(reference, final_state(run))
    assert not list(run.glob(".final-*")) and not list((run / "checkpoints").glob(".tmp-*"))


def test_kill_between_the_two_renames_of_a_replacement_leaves_a_loadable_copy(tmp_path, monkeypatch):
    """Replacing `best` renames the old copy aside, then the new one in: a kill in between loses neither."""
    import torch

    from peftkit.train import checkpoint as ckpt

    ckpt.write_checkpoint(tmp_path / "best", {"w": torch.ones(2)}, {}, {"step": 1})
    real_replace, calls = os.replace, {"n": 0}

    def killed_after_first_rename(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # stands for the kill: nothing after this point runs
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(tmp_path / "best", {"w": torch.zeros(2)}, {}, {"step": 2})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert not (tmp_path / "best").exists()
    tensors, _, state = ckpt.read_checkpoint(tmp_path / "best")  # falls back to the copy set aside
    assert state == {"step": 1} and torch.equal(tensors["w"], torch.ones(2))
    ckpt.write_checkpoint(tmp_path / "best", {"w": torch.zeros(2)}, {}, {"step": 2})  # the next write recovers
    assert ckpt.read_checkpoint(tmp_path / "best")[2] == {"step": 2}
