"""Where peftkit may write: output directories and single result files, checked before any work starts.

A run deletes and replaces files inside its output directory (``output.overwrite``, rolling checkpoints),
so a careless ``output.dir`` -- ``.``, ``~``, ``$HOME`` spelled through an unset variable, the root of the
repository one works in -- must be refused before anything is written. The helpers here only look at
paths; they import nothing beyond the standard library so the config layer can call them at load time.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from peftkit.errors import UserError

_VAR = re.compile(r"\$(?:\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_MAX_RESULT_FILE_BYTES = 64 << 20  # a larger "result file" is certainly not one peftkit wrote


def expand_path(text: str | os.PathLike, what: str = "path") -> Path:
    """``~``, ``~user``, ``$VAR`` and ``${VAR}`` expanded; an unset variable or unknown user is a UserError.

    os.path.expandvars leaves an unset ``$VAR`` in place, which would quietly create a directory literally
    named ``$VAR`` (or, for ``$UNSET/..``, resolve somewhere unexpected), so it is refused instead.
    """
    raw = os.fspath(text)
    if not isinstance(raw, str) or not raw.strip():
        raise UserError(f"{what} is empty. Give a directory or file path, e.g. runs/my-run.")
    if "\0" in raw:
        raise UserError(f"{what} {raw!r} holds a NUL character, which no file system accepts in a path.")

    def substitute(match: re.Match) -> str:
        name = match.group(1) if match.group(1) is not None else match.group(2)
        if not name or name not in os.environ:
            raise UserError(f"{what} {raw!r} uses the environment variable ${name or '{}'}, which is not set. "
                            f"Set it, or write the path out.")
        return os.environ[name]

    expanded = _VAR.sub(substitute, raw)
    if expanded.startswith("~"):
        expanded = os.path.expanduser(expanded)
        if expanded.startswith("~"):
            raise UserError(f"{what} {raw!r} starts with ~ but names no known user. Write the path out.")
    return Path(expanded)


def _git_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / ".git").exists():
            return folder
    return None


def unsafe_output_dir_reason(path: Path) -> str | None:
    """Why ``path`` must never be a run's output directory, or None when it may be one.

    Refused: the file-system root, the home directory and its ancestors, the current directory and its
    ancestors (which include the root of the git repository one works in), and any repository root.
    """
    resolved = Path(os.path.abspath(path)).resolve()
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if resolved == Path(resolved.anchor):
        return "it is the root of the file system"
    if resolved == home or resolved in home.parents:
        return "it is your home directory" if resolved == home else "it contains your home directory"
    if resolved == cwd:
        return "it is the current directory"
    if resolved in cwd.parents:
        root = _git_root(cwd)
        if root is not None and resolved == root:
            return "it is the root of the git repository you are working in"
        return "it contains the current directory"
    if (resolved / ".git").exists():
        return "it is the root of a git repository"
    return None


def check_output_dir(path: str | os.PathLike, what: str = "output.dir") -> Path:
    """Raise a UserError when ``path`` (already expanded) is a directory no run may write into."""
    path = Path(path)
    reason = unsafe_output_dir_reason(path)
    if reason:
        raise UserError(f"{what} {path} cannot be an output directory: {reason}, and a run deletes and replaces "
                        f"files in its output directory. Choose a dedicated folder such as runs/<name>.")
    return path


def resolve_output_dir(text: str | os.PathLike, what: str = "output.dir") -> Path:
    """The output directory ``text`` names: ``~`` and ``$VARS`` expanded, refused when unsafe (see
    ``unsafe_output_dir_reason``). The path is returned as written (relative stays relative)."""
    return check_output_dir(expand_path(text, what), what)


def _nearest_existing(path: Path) -> Path:
    for folder in (path, *path.parents):
        if os.path.lexists(folder):
            return folder
    return Path(path.anchor or ".")


def check_output_file(path: str | os.PathLike, what: str = "output file", must_be_json: bool = True) -> Path:
    """The result file ``path`` names, expanded and checked before any work is done.

    Refused: an existing directory; a parent that is not a directory or cannot be written; an existing
    path that is not a regular file or cannot be written; and (``must_be_json``) an existing non-empty file
    that is not JSON, which cannot be a result peftkit wrote and is not ours to replace.
    Nothing is created here.
    """
    path = expand_path(path, what)
    shown = f"{what} {path}"
    if path.is_dir():
        raise UserError(f"{shown} is a directory; give a file name inside it, e.g. {path / 'results.json'}.")
    existing = _nearest_existing(path.parent if str(path.parent) else Path("."))
    if not existing.is_dir():
        raise UserError(f"{shown} cannot be created: {existing} is a file, not a directory. Choose another path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{shown} cannot be created: {existing} is not writable. Choose a writable location.")
    if os.path.lexists(path):
        if not path.is_file():
            raise UserError(f"{shown} exists and is not a regular file. Choose another path.")
        if not os.access(path, os.W_OK):
            raise UserError(f"{shown} exists and is not writable. Choose another path.")
        if must_be_json and path.stat().st_size:
            if not _is_json_file(path):
                raise UserError(f"{shown} exists and is not a JSON result file, so peftkit will not replace it. "
                                f"Choose another path, or move that file away.")
    return path


def _is_json_file(path: Path) -> bool:
    if path.stat().st_size > _MAX_RESULT_FILE_BYTES:
        return False
    try:
        json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return True


def unique_result_path(directory: str | os.PathLike, stem: str, suffix: str = ".json") -> Path:
    """Reserve ``directory/stem.json`` (or ``stem-2.json``, ``stem-3.json``, ... when taken) and return it.

    The file is created empty with O_EXCL, so two processes finishing in the same second (same
    timestamped stem) each get their own file; the caller then writes its result into the returned path.
    """
    if not stem or "/" in stem or os.sep in stem or stem in (".", ".."):
        raise ValueError(f"result file stem must be a plain name, got {stem!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(1, 100_000):
        candidate = directory / (f"{stem}{suffix}" if n == 1 else f"{stem}-{n}{suffix}")
        try:
            fd = os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise OSError(f"no free result file name for {stem!r} in {directory}")
