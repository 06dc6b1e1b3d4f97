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


def _comparable(config: dict) -> dict:
    """The parts of a config that define the run (resume/overwrite/threads may change between attempts)."""
    c = json.loads(json.dumps(config))
    for key in ("resume", "threads", "log_every"):
        c.get("train", {}).pop(key, None)
    c.get("output", {}).pop("overwrite", None)
    return c


class RunDir:
    """Context manager: prepare ``path`` for a run with ``config`` and hold its lock until exit.

    The lock is an flock on ``.lock`` (it holds the pid, for the message): the kernel drops it when the
    process dies, even by SIGKILL, so a stale lock never blocks a resume. A directory this attempt
    created is removed again when the attempt fails with a UserError (nothing half-written is left).
    """

    def __init__(self, path: Path, config: dict, resume: bool, overwrite: bool, is_main: bool = True):
        self.path, self.config, self.resume, self.overwrite, self.is_main = Path(path), config, resume, overwrite, is_main
        self._lock_fd: int | None = None
        self._created = False

    def __enter__(self) -> Path:
        if not self.is_main:
            return self.path
        try:
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self._take_lock()
        except OSError as e:
            self._release(remove=self._created)
            raise UserError(f"cannot write to output directory {self.path}: {e.strerror or e}. "
                            f"Choose a writable output.dir.") from None
        try:
            self._check_previous_run()
            if self.overwrite and not self.resume:
                for child in self.path.iterdir():
                    if child.name != LOCK:
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            (self.path / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        except BaseException:
            self._release(remove=self._created)
            raise
        return self.path

    def _check_previous_run(self) -> None:
        saved = self.path / "config.yaml"
        if not saved.exists() or self.overwrite:
            return
        try:
            previous = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError:
            previous = {}
        same = _comparable(previous) == _comparable(self.config)
        if not self.resume:
            what = "a run of this recipe" if same else "a run of a different recipe"
            raise UserError(
                f"output directory {self.path} already holds {what}. Continue it with train.resume=auto, "
                f"replace it with output.overwrite=true, or choose another output.dir."
            )
        if not same:
            raise UserError(
                f"cannot resume in {self.path}: its run used a different recipe (compare {saved}). "
                f"Resume with the same recipe and overrides, or start a new output.dir."
            )

    def _take_lock(self) -> None:
        import fcntl

        lock = self.path / LOCK
        while True:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"output directory {self.path} is in use by another run (process {holder}, lock {lock}). "
                                f"Wait for it to finish or choose another output.dir.") from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:  # else the holder removed the file between our open and flock: try again
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _release(self, remove: bool = False) -> None:
        if self._lock_fd is not None:
            (self.path / LOCK).unlink(missing_ok=True)  # unlink before unlocking: no one can lock a dead file
            os.close(self._lock_fd)
            self._lock_fd = None
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb):
        self._release(remove=self._created and exc_type is not None and issubclass(exc_type, UserError))
        return False
