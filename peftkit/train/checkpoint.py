"""Atomic checkpoints: written into a temporary directory, checksummed, then renamed into place.

A checkpoint directory holds
  trainable.safetensors  the method's trainable state (what defines the model beyond the base)
  optimizer.pt           optimizer + scheduler state and torch RNG states (loaded with weights_only=True)
  state.json             step, data position, python RNG, best metric so far
  manifest.json          size and sha256 of every file above (written last; absent = incomplete)
A crash at any moment leaves either the previous complete checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from peftkit.errors import RunFailed

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(target: Path, tensors: dict, torch_state: dict, state: dict) -> Path:
    """Write a checkpoint at ``target`` atomically (replacing an older one of the same name).

    A write that fails (disk full, read-only file system) leaves the older checkpoints as they were and
    raises RunFailed naming the checkpoint and the cause.
    """
    try:
        return _write_checkpoint(Path(target), tensors, torch_state, state)
    except OSError as e:
        raise RunFailed(f"could not write checkpoint {target}: {e.strerror or e}. The checkpoints already complete "
                        f"in {Path(target).parent} are intact; free disk space (or fix permissions) and continue "
                        f"with train.resume=auto.") from e


def _write_checkpoint(target: Path, tensors: dict, torch_state: dict, state: dict) -> Path:
    import torch
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        torch.save(torch_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        files = {}
        for name in ("trainable.safetensors", "optimizer.pt", "state.json"):
            p = tmp / name
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=2))
        _fsync_dir(tmp)
        if target.exists():
            old = target.with_name(f".old-{target.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def is_complete(path: Path) -> bool:
    """True when the manifest exists and every file has its recorded size (cheap check)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
        return all((Path(path) / n).stat().st_size == meta["bytes"] for n, meta in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def verify(path: Path) -> None:
    """Raise ValueError when a file of the checkpoint is missing or its checksum differs."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    for name, meta in manifest["files"].items():
        if _sha256(Path(path) / name) != meta["sha256"]:
            raise ValueError(f"checkpoint {path}: {name} does not match its checksum (corrupted)")


def read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(tensors, torch_state, state) of a verified checkpoint."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    old = path.with_name(f".old-{path.name}")
    if not path.exists() and is_complete(old):  # killed between the two renames of a replacement
        path = old
    verify(path)
    tensors = load_file(str(path / "trainable.safetensors"))
    torch_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    state = json.loads((path / "state.json").read_text())
    return tensors, torch_state, state


def step_checkpoints(directory: Path) -> list[Path]:
    """Complete step-NNNNNN checkpoints, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("step-*") if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prune(directory: Path, keep_last: int) -> None:
    for old in step_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in Path(directory).glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
