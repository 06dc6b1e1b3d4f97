"""SIGTERM/SIGINT stop with a checkpoint and exit 130; two runs on one output dir; a stale lock."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from helpers.reliability import (
    assert_identical,
    final_state,
    invoke,
    make_setup,
    recipe,
    run_cli,
    start_cli,
    write_recipe,
)

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

STEPS = 60
TRAIN = {"max_steps": STEPS, "save_every": 10, "eval_every": 10, "keep_last": 2, "log_every": 10}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from peftkit.commands.train import finetune

    setup = make_setup(tmp_path_factory.mktemp("signals"))
    path = write_recipe(Path(setup["root"]) / "straight.yaml", recipe(setup, "straight", **TRAIN))
    return setup, final_state(finetune(path, []))


def _wait_until_training(run: Path, proc, timeout: float = 120) -> None:
    """Wait for the first logged training step (the signal handler is installed by then)."""
    deadline = time.monotonic() + timeout
    while not (run / "metrics.jsonl").exists():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before training"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_checkpoint_exits_130_and_resume_is_identical(straight, sig):
    from peftkit.train.checkpoint import read_checkpoint, step_checkpoints

    setup, reference = straight
    name = f"signal-{sig.name}"
    run = Path(setup["root"]) / name
    log = Path(setup["root"]) / f"{name}.log"
    path = write_recipe(Path(setup["root"]) / f"{name}.yaml", recipe(setup, name, **{**TRAIN, "log_every": 1}))
    proc = start_cli("finetune", path, log=log)
    try:
        _wait_until_training(run, proc)
        assert proc.poll() is None
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Traceback" not in text and "Interrupted: stopped by signal" in text and "train.resume=auto" in text
    latest = step_checkpoints(run / "checkpoints")[-1]
    stopped_at = int(latest.name.split("-")[1])
    assert 1 <= stopped_at < STEPS and f"at step {stopped_at}" in text  # saved at the step it stopped
    read_checkpoint(latest)
    assert not (run / ".lock").exists() and not (run / "final").exists()

    resumed = run_cli("finetune", path, "train.resume=auto", timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {latest}" in resumed.stdout
    assert_identical(reference, final_state(run))


def test_second_run_on_same_output_dir_is_refused_by_the_lock(straight):
    setup, reference = straight
    run = Path(setup["root"]) / "shared-dir"
    path = write_recipe(Path(setup["root"]) / "shared-dir.yaml", recipe(setup, "shared-dir", **{**TRAIN, "save_every": 1, "log_every": 1}))
    first = start_cli("finetune", path, log=Path(setup["root"]) / "shared-dir.log")
    try:
        _wait_until_training(run, first)
        # paused mid-run (it keeps its lock): the attempts below meet a live run however fast either machine is
        os.kill(first.pid, signal.SIGSTOP)
        try:
            # the second run, plain, resuming, or asking to overwrite: each refused, naming the lock
            for extra in ([], ["train.resume=auto"], ["output.overwrite=true"]):
                second = invoke("finetune", path, *extra)
                assert second.exit_code == 2, second.output
                assert "in use by another run" in second.output and str(run / ".lock") in second.output
                assert f"process {first.pid}" in second.output
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0, (Path(setup["root"]) / "shared-dir.log").read_text()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert_identical(reference, final_state(run))  # the first run finished intact
    assert not (run / ".lock").exists()


def test_stale_lock_of_a_dead_process_does_not_block(straight, tmp_path):
    setup, _ = straight
    run = Path(setup["root"]) / "stale"
    run.mkdir()
    (run / ".lock").write_text("999999")  # left by a process killed with SIGKILL (no flock held any more)
    path = write_recipe(tmp_path / "stale.yaml", recipe(setup, "stale", max_steps=2))
    result = invoke("finetune", path)
    assert result.exit_code == 0, result.output
    assert (run / "final").is_dir() and not (run / ".lock").exists()
