"""The run directory: created once, marked as peftkit's, locked while a run writes to it, never silently reused.

A directory that already holds a run with a different resolved config is refused unless the recipe
asks to resume (train.resume) or to overwrite (output.overwrite). A lock file stops a second process
from writing into a directory that a live run holds.

A run writes only into a new or empty directory, or one carrying the marker file ``.peftkit-run``
(JSON naming what peftkit wrote there). A non-empty directory without the marker is someone else's and is
refused whatever the recipe asks, and ``output.overwrite`` removes only the entries peftkit wrote: a user
who points ``output.dir`` at a folder of their own loses nothing. The marker lists names as peftkit writes
them (the run layout, the outputs a command declares, ``record_written``), never what a listing of the
directory shows: a file the user saves into a run directory while it trains stays the user's.

Nothing is written through a symbolic link: a link at any name peftkit writes in the directory is refused
before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

import yaml

from peftkit.errors import UserError
from peftkit.utils.atomic import atomic_write_json, atomic_write_text
from peftkit.utils.output_paths import check_output_dir

LOCK = ".lock"
MARKER = ".peftkit-run"
# Every name a peftkit run may create at the top of its directory (finetune, finetune_lm, pretrain), and
# the prefixes of the temporary directories it renames into place; the marker lists them from the start,
# so even a run killed before it could record what it wrote is cleaned up by a later overwrite.
RUN_LAYOUT = ("config.yaml", "checkpoints", "final", "metrics.jsonl", "metrics.json", "train.log", "env.json",
              "plan.json")
TEMP_PREFIXES = (".final-", ".tmp-")
# Markers before version 2 listed whatever the directory held when the run ended, a user's files included, so
# only the names of the run layout are trusted from them.
MARKER_VERSION = 2


def _comparable(config: dict) -> dict:
    """The parts of a config that define the run (resume/overwrite/threads may change between attempts)."""
    c = json.loads(json.dumps(config))
    for key in ("resume", "resume_any", "threads", "log_every"):
        c.get("train", {}).pop(key, None)
    c.pop("output", None)  # where the run lives and whether it may replace itself do not change what it computes
    return c


def read_marker(path: Path) -> dict | None:
    """The marker of run directory ``path``: {} when present but unreadable, None when absent."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        content = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _written_names(marker: dict) -> set[str]:
    names = marker.get("written", [])
    if not isinstance(names, list) or marker.get("version") != MARKER_VERSION:
        return set()
    return {n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..", LOCK, MARKER)}


def _marker_content(marker: dict, written: Iterable[str]) -> dict:
    return {"tool": "peftkit", "kind": "run directory", "version": MARKER_VERSION,
            "created": marker.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "written": sorted(set(written)),
            "note": "peftkit writes into and deletes from this directory only the entries listed in 'written'."}


def record_written(run_dir: Path, names: Iterable[str]) -> None:
    """Add ``names`` (top-level entries peftkit is about to write into the run directory ``run_dir``) to its
    marker, so that an overwrite removes them; nothing happens in a directory without a marker."""
    marker = read_marker(run_dir)
    if not marker:
        return
    written = _written_names(marker) | set(RUN_LAYOUT)
    new = {n for n in names if n not in written}
    if new:
        atomic_write_json(Path(run_dir) / MARKER, _marker_content(marker, written | new))


class RunDir:
    """Context manager: prepare ``path`` for a run with ``config`` and hold its lock until exit.

    The lock is an flock on ``.lock`` (it holds the pid, for the message): the kernel drops it when the
    process dies, even by SIGKILL, so a stale lock never blocks a resume. A directory this attempt
    created is removed again when the attempt fails with a UserError (nothing half-written is left).
    ``outputs`` names further top-level entries the caller will write (beyond RUN_LAYOUT): the marker lists
    them from the start, so that an overwrite may remove them even if the process dies before it ends.
    ``before_write(path)`` runs under the lock after every check of the directory and before anything is
    written into it (the marker, config.yaml): a check that fails there leaves the directory as it was.
    """

    def __init__(self, path: Path, config: dict, resume: bool, overwrite: bool, is_main: bool = True,
                 outputs: tuple[str, ...] = (), before_write: Callable[[Path], None] | None = None):
        self.path, self.config, self.resume, self.overwrite, self.is_main = Path(path), config, resume, overwrite, is_main
        self.outputs = tuple(outputs)
        self.before_write = before_write
        self._lock_fd: int | None = None
        self._created = False

    def __enter__(self) -> Path:
        if not self.is_main:
            if self.before_write is not None:
                self.before_write(self.path)
            return self.path
        check_output_dir(self.path)
        try:
            if self.path.is_dir():
                marker = self._refuse_foreign_content()  # before the lock file: nothing is written into a folder not ours
                self._refuse_links(marker or {})
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self._take_lock()
        except OSError as e:
            self._release(remove=self._created)
            raise UserError(f"cannot write to output directory {self.path}: {e.strerror or e}. "
                            f"Choose a writable output.dir.") from None
        try:
            marker = self._refuse_foreign_content()  # again under the lock: the folder may have changed meanwhile
            self._refuse_links(marker or {})
            self._check_previous_run()
            if self.before_write is not None:
                self.before_write(self.path)
            if self.overwrite and not self.resume:
                self._remove_previous_run(marker or {})
                marker = {}
            self._write_marker(marker or {})
            atomic_write_text(self.path / "config.yaml", yaml.safe_dump(self.config, sort_keys=False))
        except BaseException:
            self._release(remove=self._created)
            raise
        return self.path

    def _refuse_links(self, marker: dict) -> None:
        """A UserError when an entry peftkit writes (or deletes) here is a symbolic link: writing through it would
        change a file outside the run directory."""
        for child in sorted(self.path.iterdir()):
            if child.is_symlink() and (child.name in (LOCK, MARKER) or self._ours(child.name, marker)):
                raise UserError(
                    f"{child} is a symbolic link (to {os.readlink(child)}), in the place of a file peftkit writes in "
                    f"its run directory. peftkit never writes through a link: it would change the file the link "
                    f"points to. Remove the link (or put the file itself there), or choose another output.dir.")

    def _entries(self) -> set[str]:
        return {child.name for child in self.path.iterdir()} - {LOCK}

    def _ours(self, name: str, marker: dict) -> bool:
        return (name in RUN_LAYOUT or name in self.outputs or name in _written_names(marker) or name.startswith(MARKER)
                or name.startswith(TEMP_PREFIXES))

    def _refuse_foreign_content(self) -> dict | None:
        """The directory's marker (None for an empty one); a UserError when it holds files peftkit did not write."""
        entries = self._entries()
        marker = read_marker(self.path)
        if marker is not None:
            return marker
        if not entries:
            return None
        if self._is_unmarked_run(entries):
            return {}
        shown = ", ".join(sorted(entries)[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise UserError(
            f"output directory {self.path} already exists and holds files peftkit did not write ({shown}). A run "
            f"writes only into a new or empty directory or into one it created (marked by {MARKER}), and "
            f"output.overwrite never deletes files of yours. Choose another output.dir, e.g. {self.path / 'run'}."
        )

    def _is_unmarked_run(self, entries: set[str]) -> bool:
        """A run directory written before run directories were marked: only run files, config + env + log present."""
        return ({"config.yaml", "env.json", "train.log"} <= entries
                and all(self._ours(n, {}) for n in entries))

    def _remove_previous_run(self, marker: dict) -> None:
        """Delete what peftkit wrote (RUN_LAYOUT, ``outputs``, the names the marker lists); keep everything else."""
        for child in self.path.iterdir():
            if child.name in (LOCK, MARKER) or not self._ours(child.name, marker):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _write_marker(self, marker: dict) -> None:
        """Record in the marker what peftkit writes here: RUN_LAYOUT, ``outputs`` and what earlier runs recorded."""
        written = _written_names(marker) | set(RUN_LAYOUT) | set(self.outputs)
        atomic_write_json(self.path / MARKER, _marker_content(marker, written))

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
        if not same and not (self.config.get("train") or {}).get("resume_any"):
            raise UserError(
                f"cannot resume in {self.path}: its run used a different recipe (compare {saved}). "
                f"Resume with the same recipe and overrides, start a new output.dir, or set train.resume_any=true "
                f"to continue with the new settings."
            )

    def _take_lock(self) -> None:
        import fcntl

        lock = self.path / LOCK
        while True:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o644)
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
