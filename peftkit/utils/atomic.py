"""Writing files and directories so that a reader sees the old content or the new, never half of one, and so
that nothing peftkit writes goes through a symbolic link into a file it does not own.

Every file peftkit writes whole (results, the run marker, config.yaml, env.json, metrics) goes through
``atomic_write_bytes``: the bytes go to a fresh temporary file beside the target (created with O_EXCL and
O_NOFOLLOW), are flushed to disk, and the temporary file is renamed over the target. A rename replaces a
link at the target instead of writing into the file it points to; a link at the target is refused all the
same, because the link is the user's. ``may_replace`` lets the caller refuse an existing file that peftkit
did not write. Directories appear whole through ``publish_dir`` (never over an existing entry) and
``replace_dir`` (over an older copy of peftkit's own). Files that grow line by line (logs) are opened
with ``open_append``, which refuses a link as well.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable

from peftkit.errors import UserError


def refuse_symlink(path: str | os.PathLike, what: str = "") -> None:
    """A UserError when ``path`` is a symbolic link: peftkit never writes through one, nor replaces it."""
    path = Path(path)
    if path.is_symlink():
        shown = f"{what} {path}" if what else str(path)
        raise UserError(f"{shown} is a symbolic link (to {os.readlink(path)}), and peftkit never writes through a "
                        f"link: it would change the file the link points to. Remove the link, or choose another "
                        f"path.")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, may_replace: Callable[[Path], bool] | None = None,
                       what: str = "", fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` whole or not at all (temp file beside it, fsync, rename).

    Refused with a UserError: ``path`` is a symbolic link, or it is an existing non-empty file and
    ``may_replace(path)`` says it is not one peftkit wrote. An OSError (disk full) leaves ``path`` as it was
    and no temporary file behind.
    """
    path = Path(path)
    refuse_symlink(path, what)
    if may_replace is not None and path.is_file() and path.stat().st_size and not may_replace(path):
        shown = f"{what} {path}" if what else str(path)
        raise UserError(f"{shown} exists and is not a file peftkit wrote, so peftkit will not replace it. Write to "
                        f"another path, or remove that file yourself if you no longer need it.")
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            _write_file(fd, tmp, data, fsync)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        if e.filename is None:  # write(2) names no file: name the one being written, for the message
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    return path


def _write_file(fd: int, tmp: Path, data: bytes, fsync: bool) -> None:
    """Write ``data`` to the open temporary file ``tmp`` (descriptor ``fd``) and close it."""
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str, **kwargs) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), **kwargs)


def atomic_write_json(path: str | os.PathLike, content, *, indent: int | None = 2, default=None, **kwargs) -> Path:
    return atomic_write_text(path, json.dumps(content, indent=indent, default=default) + "\n", **kwargs)


def open_append(path: str | os.PathLike, what: str = ""):
    """``path`` opened for appending text, created when missing; a symbolic link there is a UserError."""
    path = Path(path)
    refuse_symlink(path, what)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a link appeared after the check above
            refuse_symlink(path, what)
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with FileExistsError when ``dst`` exists (renameat2 RENAME_NOREPLACE on Linux)."""
    rename = _renameat2()
    if rename is not None:
        if rename(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
            return
        import ctypes

        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):  # else the file system cannot: fall back below
            raise OSError(code, os.strerror(code), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)  # a directory appearing meanwhile makes this fail (ENOTEMPTY) unless it is empty


_RENAMEAT2: list = []


def _renameat2():
    if not _RENAMEAT2:
        function = None
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            function = libc.renameat2
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        except (OSError, AttributeError):
            function = None
        _RENAMEAT2.append(function)
    return _RENAMEAT2[0]


class TargetAppeared(FileExistsError):
    """``publish_dir``'s target was created by someone else after the caller checked that it was free."""


def publish_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename the finished directory ``tmp`` to ``target``, which must not exist (an empty directory there is
    taken: removed first). Raises TargetAppeared when something else is at ``target`` by the time of the
    rename; ``tmp`` is then left for the caller to remove."""
    tmp, target = Path(tmp), Path(target)
    if target.is_dir() and not target.is_symlink():
        try:
            target.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise TargetAppeared(e.errno, "not empty", str(target)) from None
    try:
        _rename_noreplace(tmp, target)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise TargetAppeared(e.errno, os.strerror(e.errno), str(target)) from None
        raise
    fsync_dir(target.parent)
    return target


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike, aside: str | os.PathLike) -> Path:
    """Put the finished directory ``tmp`` at ``target``, replacing peftkit's older copy there: the old one is
    renamed to ``aside`` first (so a kill between the two renames leaves a whole copy), then removed."""
    tmp, target, aside = Path(tmp), Path(target), Path(aside)
    refuse_symlink(target)
    if target.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
        os.replace(tmp, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)
    return target


_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})  # the disk, not the input


def io_error_of(error: BaseException, path: str | os.PathLike | None = None) -> OSError | None:
    """The OSError behind ``error``, or None when it is not a failure of the file system.

    Libraries report a full disk in their own words: safetensors raises ``SafetensorError: ... No space left
    on device (os error 28)``; transformers and torch wrap the OSError of the write. This finds the errno in
    either, so that a full disk is reported as one (exit 1), not as a crash.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error
        found = _OS_ERROR_IN_TEXT.search(str(error))
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code), None if path is None else str(path))
        error = error.__cause__ or error.__context__
    return None
