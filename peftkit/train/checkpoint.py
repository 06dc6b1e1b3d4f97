"""Atomic checkpoints: written into a temporary directory, checksummed, then renamed into place.

A checkpoint directory holds
  trainable.safetensors  the method's trainable state (what defines the model beyond the base)
  optimizer.pt           optimizer + scheduler state and torch RNG states (loaded with weights_only=True)
  state.json             step, data position, python RNG, best metric so far
  manifest.json          size and sha256 of every file above (written last; absent = incomplete)
A crash at any moment leaves either the previous complete checkpoint or the new one, never half of one.

Reading heals what a crash, a full disk or a stray hand can still leave behind: a step checkpoint that
fails its checksum or does not parse is passed over for the previous good one (with a log line), a
damaged ``best`` gives way to the newest good step checkpoint, and entries of the checkpoints folder that
are not named ``step-NNNNNN`` (notes, copies, half-written temp dirs) are never taken for checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from peftkit.errors import RunFailed
from peftkit.utils.atomic import fsync_dir, io_error_of, refuse_symlink, replace_dir

MANIFEST = "manifest.json"
FILES = ("trainable.safetensors", "optimizer.pt", "state.json")
STEP_NAME = re.compile(r"step-(\d{6,})")


class CheckpointDamaged(ValueError):
    """A checkpoint that is missing a file, fails its checksum or does not parse."""


def settings_digest(settings) -> str:
    """A short stable hash of the settings that change a run's result (JSON-serialisable values).

    Stored in every checkpoint (state.json ``settings_hash``) so that a resume can tell whether the
    checkpoint was written by the same recipe; key order does not matter.
    """
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _torch_save(obj, path: Path) -> None:
    """torch.save into ``path``; a failing write raises its OSError (torch reports it as a RuntimeError that
    names neither the errno nor the cause, e.g. "unexpected pos 704 vs 598" on a full disk)."""
    import torch

    with open(path, "wb") as f:
        sink = _ErrorKeepingFile(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


class _ErrorKeepingFile(io.RawIOBase):
    """A writable file that remembers the OSError of a failed write (torch swallows it)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise


def write_checkpoint(target: Path, tensors: dict, torch_state: dict, state: dict) -> Path:
    """Write a checkpoint at ``target`` atomically (replacing an older one of the same name).

    A write that fails (disk full, read-only file system) leaves the older checkpoints as they were and
    raises RunFailed naming the checkpoint and the cause.
    """
    try:
        return _write_checkpoint(Path(target), tensors, torch_state, state)
    except Exception as e:
        cause = io_error_of(e)
        if cause is None:
            raise
        raise RunFailed(f"could not write checkpoint {target}: {cause.strerror or cause}. The checkpoints already "
                        f"complete in {Path(target).parent} are intact; free disk space (or fix permissions) and "
                        f"continue with train.resume=auto.") from e


def _write_checkpoint(target: Path, tensors: dict, torch_state: dict, state: dict) -> Path:
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    refuse_symlink(target.parent, "the checkpoints folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        _torch_save(torch_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        files = {}
        for name in ("trainable.safetensors", "optimizer.pt", "state.json"):
            p = tmp / name
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=2))
        fsync_dir(tmp)
        replace_dir(tmp, target, aside=target.with_name(f".old-{target.name}"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _manifest_files(path: Path) -> dict:
    """The manifest's {file name: {bytes, sha256}}; it may name only the checkpoint's own files."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    files = manifest["files"]
    if not isinstance(files, dict) or set(files) != set(FILES):
        raise ValueError(f"the manifest lists {sorted(files) if isinstance(files, dict) else files!r}, "
                         f"expected {list(FILES)}")
    return files


def is_complete(path: Path) -> bool:
    """True when the manifest exists and every file has its recorded size (cheap check)."""
    try:
        return all((Path(path) / n).stat().st_size == meta["bytes"] for n, meta in _manifest_files(path).items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def verify(path: Path) -> None:
    """Raise CheckpointDamaged when a file of the checkpoint is missing or its checksum differs."""
    try:
        files = _manifest_files(path)
        for name, meta in files.items():
            if _sha256(Path(path) / name) != meta["sha256"]:
                raise CheckpointDamaged(f"checkpoint {path}: {name} does not match its checksum (corrupted)")
    except CheckpointDamaged:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointDamaged(f"checkpoint {path}: unreadable manifest or file ({e})") from e


def read_checkpoint(path: Path, required: tuple[str, ...] = ()) -> tuple[dict, dict, dict]:
    """(tensors, torch_state, state) of a verified checkpoint whose state.json holds every key in ``required``.

    Raises CheckpointDamaged (a ValueError) when anything is missing, fails its checksum or does not parse.
    """
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    old = path.with_name(f".old-{path.name}")
    if not path.exists() and is_complete(old):  # killed between the two renames of a replacement
        path = old
    verify(path)
    try:
        tensors = load_file(str(path / "trainable.safetensors"))
        torch_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except Exception as e:  # any parser's failure on a file that passed its checksum: written damaged
        raise CheckpointDamaged(f"checkpoint {path}: cannot be parsed ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not isinstance(torch_state, dict):
        raise CheckpointDamaged(f"checkpoint {path}: state.json or optimizer.pt does not hold a mapping")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointDamaged(f"checkpoint {path}: state.json lacks {missing}")
    return tensors, torch_state, state


def step_checkpoints(directory: Path) -> list[Path]:
    """Complete step-NNNNNN checkpoints, oldest first; every other entry of ``directory`` is ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if STEP_NAME.fullmatch(p.name) and p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_NAME.fullmatch(p.name).group(1)))


def read_latest_good(directory: Path, log: Callable[[str], None], required: tuple[str, ...] = ()):
    """(path, tensors, torch_state, state) of the newest step checkpoint that verifies and parses, or None.

    A damaged newer one is passed over with a log line naming it and the reason; it stays on disk (it
    is evidence, and the resumed run replaces it when it reaches that step again).
    """
    for path in reversed(step_checkpoints(directory)):
        try:
            return (path, *read_checkpoint(path, required))
        except CheckpointDamaged as e:
            log(f"warning: skipping damaged checkpoint {path}: {e}; falling back to the previous one")
    return None


def read_best_or_latest(directory: Path, log: Callable[[str], None]) -> tuple[Path, dict] | None:
    """(path, tensors) of ``directory/best``, or of the newest good step checkpoint when best is damaged."""
    best = Path(directory) / "best"
    try:
        return best, read_checkpoint(best)[0]
    except CheckpointDamaged as e:
        log(f"warning: the best checkpoint {best} is damaged ({e}); using the newest good step checkpoint instead")
    found = read_latest_good(directory, log)
    return (found[0], found[1]) if found else None


def prune(directory: Path, keep_last: int) -> None:
    for old in step_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in Path(directory).glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
