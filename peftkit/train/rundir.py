"""The run directory: created once, locked while a run writes to it, never silently reused.

A directory that already holds a run with a different resolved config is refused unless the recipe
asks to resume (train.resume) or to overwrite (output.overwrite). A lock file stops a second process
from writing into a directory that a live run holds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from peftkit.errors import UserError

LOCK = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _comparable(config: dict) -> dict:
    """The parts of a config that define the run (resume/overwrite/threads may change between attempts)."""
    c = json.loads(json.dumps(config))
    for key in ("resume", "threads", "log_every"):
        c.get("train", {}).pop(key, None)
    c.get("output", {}).pop("overwrite", None)
    return c


class RunDir:
    """Context manager: prepare ``path`` for a run with ``config`` and hold its lock until exit."""

    def __init__(self, path: Path, config: dict, resume: bool, overwrite: bool, is_main: bool = True):
        self.path, self.config, self.resume, self.overwrite, self.is_main = Path(path), config, resume, overwrite, is_main
        self._locked = False

    def __enter__(self) -> Path:
        if not self.is_main:
            return self.path
        saved = self.path / "config.yaml"
        if saved.exists() and not self.resume and not self.overwrite:
            try:
                previous = yaml.safe_load(saved.read_text()) or {}
            except yaml.YAMLError:
                previous = {}
            what = "a run of a different recipe" if _comparable(previous) != _comparable(self.config) else "a run of this recipe"
            raise UserError(
                f"output directory {self.path} already holds {what}. Continue it with train.resume=auto, "
                f"replace it with output.overwrite=true, or choose another output.dir."
            )
        if saved.exists() and self.resume and not self.overwrite:
            try:
                previous = yaml.safe_load(saved.read_text()) or {}
            except yaml.YAMLError:
                previous = {}
            if _comparable(previous) != _comparable(self.config):
                raise UserError(
                    f"cannot resume in {self.path}: its run used a different recipe (compare {saved}). "
                    f"Resume with the same recipe and overrides, or start a new output.dir."
                )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._take_lock()
        except PermissionError as e:
            raise UserError(f"cannot write to output directory {self.path}: {e.strerror}. Choose a writable output.dir.") from None
        if self.overwrite and not self.resume:
            for child in self.path.iterdir():
                if child.name != LOCK:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        saved.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return self.path

    def _take_lock(self) -> None:
        lock = self.path / LOCK
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _pid_alive(pid):
                    raise UserError(f"output directory {self.path} is in use by another run (process {pid}, lock {lock}). "
                                    f"Wait for it to finish or choose another output.dir.") from None
                lock.unlink(missing_ok=True)  # stale lock of a dead process
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self._locked = True
            return
        raise UserError(f"could not take the lock {lock}; remove it if no run is using {self.path}.")

    def __exit__(self, *exc):
        if self._locked:
            (self.path / LOCK).unlink(missing_ok=True)
        return False
