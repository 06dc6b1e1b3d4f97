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


RESULT_KEY = "written_by"  # top-level key of every JSON result peftkit writes: how it knows the file is its own
# The objects `peftkit predict` / `generate` write, one a line: a JSON-lines file of only these is a result of theirs.
PREDICTION_SHAPES = (frozenset({"label", "probabilities"}), frozenset({"value"}), frozenset({"prompt", "generation"}))


def check_output_file(path: str | os.PathLike, what: str = "output file", must_be_json: bool = True,
                      inputs: tuple[str | os.PathLike, ...] = (), is_ours=None) -> Path:
    """The result file ``path`` names, expanded and checked before any work is done.

    Refused: an existing directory or symbolic link; a parent that is not a directory or cannot be written;
    the same file as one of ``inputs`` (also through a link or a hard link); and an existing non-empty file
    that peftkit did not write: ``is_ours(path)`` decides, by default ``is_peftkit_json`` (``must_be_json``)
    or ``is_peftkit_jsonl``. Nothing is created here.
    """
    path = expand_path(path, what)
    shown = f"{what} {path}"
    if path.is_symlink():
        raise UserError(f"{shown} is a symbolic link (to {os.readlink(path)}); peftkit does not write through or "
                        f"replace links. Give the path of a regular file.")
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
        for source in inputs:
            if source and _same_file(path, source):
                raise UserError(f"{shown} is the input file {source}; writing the results there would replace the "
                                f"rows they were computed from. Choose another output path.")
        if not os.access(path, os.W_OK):
            raise UserError(f"{shown} exists and is not writable. Choose another path.")
        is_ours = is_ours or (is_peftkit_json if must_be_json else is_peftkit_jsonl)
        if path.stat().st_size and not is_ours(path):
            kind = "JSON result file" if must_be_json else "JSON-lines result file"
            raise UserError(f"{shown} exists and is not a {kind} peftkit wrote, so peftkit will not replace it. "
                            f"Write to another path, or remove that file yourself if you no longer need it.")
    return path


def _same_file(a: Path, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, os.path.expanduser(os.fspath(b)))
    except (OSError, ValueError):
        return False


def is_peftkit_json(path: Path) -> bool:
    """True for a JSON result peftkit wrote: an object with ``written_by: peftkit``, or the shape results had
    before that key (a ``bench`` name and its ``rows``; a ``wikitext2`` evaluation's ``rows``)."""
    if path.stat().st_size > _MAX_RESULT_FILE_BYTES:
        return False
    try:
        content = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    if not isinstance(content, dict):
        return False
    if content.get(RESULT_KEY) == "peftkit":
        return True
    return isinstance(content.get("rows"), list) and (isinstance(content.get("bench"), str)
                                                      or content.get("task") == "wikitext2")


def is_peftkit_jsonl(path: Path) -> bool:
    """True for predictions peftkit wrote: every line a JSON object with exactly the keys of one of
    PREDICTION_SHAPES (``label`` + ``probabilities``, ``value``, or ``prompt`` + ``generation``)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or frozenset(row) not in PREDICTION_SHAPES:
                    return False
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return True


def write_result_json(path: str | os.PathLike, payload: dict, what: str = "result file") -> Path:
    """Write ``payload`` (with ``written_by: peftkit`` first) to ``path`` whole, never over a file peftkit did
    not write (checked again here: the file may have appeared while the work ran)."""
    from peftkit.utils.atomic import atomic_write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, {RESULT_KEY: "peftkit", **payload}, default=str, may_replace=is_peftkit_json,
                             what=what)


def write_result_jsonl(path: str | os.PathLike, records: list[dict], what: str = "--output") -> Path:
    """Write predictions to ``path`` as JSON lines, whole, never over a file peftkit did not write."""
    from peftkit.utils.atomic import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return atomic_write_text(path, text, may_replace=is_peftkit_jsonl, what=what)


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
