"""`peftkit export RUN --out DIR [--merge/--no-merge] [--merge-mode calibrated|naive|float]`: a finished run as a directory that loads outside peftkit.

The directory appears whole or not at all: everything is written into a temporary sibling and renamed into place,
never over a directory that another process created meanwhile, and never through a symbolic link.
``--out`` must be new or empty (peftkit never writes into a folder of yours); the export carries peftkit's marker,
listing what it wrote.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from peftkit.errors import RunFailed, UserError


def export(run: str, out: str, merge: bool | None = None, merge_mode: str | None = None, calib: str | None = None,
           calib_windows: int | None = None, calib_len: int | None = None, tune_windows: int | None = None,
           tune_epochs: int | None = None, tune_lr: float | None = None) -> Path:
    """Write the export; print what it holds and how big it is next to the base; return the directory.

    ``merge_mode`` and the calibration settings choose how LoRA on a quantized base (apiq) merges
    (peftkit/artifacts/lowbit_merge.py); other runs refuse them."""
    from peftkit.artifacts.card import size_rows
    from peftkit.artifacts.lowbit_merge import MergeRequest
    from peftkit.artifacts.export import write_export
    from peftkit.train.rundir import MARKER
    from peftkit.utils.atomic import TargetAppeared, atomic_write_json, io_error_of, publish_dir
    from peftkit.utils.output_paths import expand_path, resolve_output_dir
    from peftkit.utils.tables import format_table

    source = expand_path(run, "RUN")
    if not source.is_dir():
        raise UserError(f"RUN {run} is not a directory. Give a run directory (runs/<name>) or its final/ directory.")
    target = resolve_output_dir(out, "--out")
    if target.is_symlink():
        raise UserError(f"--out {target} is a symbolic link (to {os.readlink(target)}); peftkit does not write an "
                        f"export through a link. Give the path of a new directory.")
    if os.path.lexists(target) and not target.is_dir():
        raise UserError(f"--out {target} exists and is not a directory. Choose a new directory for the export.")
    if target.is_dir() and any(target.iterdir()):
        raise UserError(f"--out {target} already exists and is not empty. peftkit writes an export only into a new or "
                        f"empty directory; choose another --out (or remove an earlier export there yourself).")
    if target.resolve() == source.resolve() or source.resolve() in target.resolve().parents:
        raise UserError(f"--out {target} lies inside the run {source}. Choose a directory outside the run.")
    lowbit = MergeRequest(merge_mode, calib, calib_windows, calib_len, tune_windows, tune_epochs, tune_lr)
    flags = {"--merge-mode": merge_mode, "--calib": calib, "--calib-windows": calib_windows, "--calib-len": calib_len,
             "--tune-windows": tune_windows, "--tune-epochs": tune_epochs, "--tune-lr": tune_lr}
    command = " ".join(["peftkit", "export", str(run), "--out", str(out)]
                       + ([] if merge is None else ["--merge" if merge else "--no-merge"])
                       + [f"{flag} {value}" for flag, value in flags.items() if value is not None])
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {target} cannot be created: {e.strerror or e}. Choose a writable location.") from None
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        # the low-bit merge settings travel only when given: the default export call stays as it was
        extra = {"lowbit": lowbit} if lowbit.given() else {}
        exported = write_export(source, tmp, merge, command, shown_as=str(target), **extra)
        marker = {"tool": "peftkit", "kind": "export", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "written": sorted(p.name for p in tmp.iterdir()),
                  "note": "peftkit writes into and deletes from this directory only the entries listed in 'written'."}
        atomic_write_json(tmp / MARKER, marker)
        umask = os.umask(0)
        os.umask(umask)
        for path in (tmp, *tmp.rglob("*")):  # mkdtemp (and safetensors) make them private: the usual modes instead
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        publish_dir(tmp, target)  # never over something another process put there meanwhile
    except TargetAppeared:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"--out {target} did not exist when this export started, but another process created it "
                        f"while the export was being written (another export to the same place?). It was left as it "
                        f"is and this export was discarded; choose another --out.") from None
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = io_error_of(e) if isinstance(e, Exception) and not isinstance(e, UserError) else None
        if cause is not None:
            raise RunFailed(f"could not write the export {target}: {cause.strerror or cause}. Nothing was written "
                            f"there; free disk space (or fix permissions) and run the export again.") from e
        raise
    e = exported["export"]
    what = f"{exported.get('method', 'model')} run, {e['format']} format" + (", merged" if e.get("merged") else "")
    print(f"exported {source} ({what}) to {target}")
    print(format_table([{k: v for k, v in r.items() if k != "bytes"} for r in size_rows(target, exported)]))
    return target
