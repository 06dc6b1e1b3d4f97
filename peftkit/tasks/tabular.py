"""Reading one's own rows: local CSV / TSV / JSON / JSONL / Parquet files and hub dataset ids, through `datasets`.

Everything a file can get wrong is a UserError naming the file, the row (1-based, header not counted) and the
column: a missing column, an empty file, an empty cell, a value of the wrong type, labels of mixed types, a
validation label the training rows never had. Local files are read with a throw-away datasets cache, so nothing
is left behind; a hub id is read from datasets' own cache (HF_DATASETS_OFFLINE=1 keeps it off the network).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import UserError

# file suffix -> (datasets builder, extra builder options)
FORMATS: dict[str, tuple[str, dict]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
SPLIT_SEED = 0  # the held-out validation share is drawn with this seed: the same rows every run, whatever train.seed


@dataclass
class Table:
    """Rows of one source, with where they came from (for messages)."""

    rows: list[dict]
    where: str

    @property
    def columns(self) -> list[str]:
        return list(self.rows[0]) if self.rows else []


def format_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a table, or None."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in FORMATS:
        return f"{p} has the suffix {p.suffix or '(none)'!r}; use one of {', '.join(FORMATS)}"
    if not p.is_file():
        return f"{p} does not exist" if not p.exists() else f"{p} is not a file"
    return None


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def read_file(path: str | Path) -> Table:
    """All rows of a local file, read by the datasets builder for its suffix."""
    import tempfile

    p = Path(path).expanduser()
    problem = format_problem(p)
    if problem:
        raise UserError(f"cannot read {problem}.")
    if p.stat().st_size == 0:
        raise UserError(f"{p} is empty. Give a file with a header (CSV) or one JSON object per line, and at least one row.")
    datasets = _quiet_datasets()
    builder, options = FORMATS[p.suffix.lower()]
    try:
        with tempfile.TemporaryDirectory(prefix="peftkit-datasets-") as cache:
            ds = datasets.load_dataset(builder, data_files={"train": str(p)}, split="train", cache_dir=cache,
                                       keep_in_memory=True, **options)
            rows = ds.to_list()
    except Exception as e:  # any parse error of any format: the file, not peftkit
        text = str(e).split("\n")[0][:300]
        if "corresponds to no data" in text:  # a header and nothing under it
            raise UserError(f"{p} holds no rows. Give at least one row under the header.") from None
        raise UserError(f"cannot read {p} as {builder}: {type(e).__name__}: {text}. Check that it is a valid "
                        f"{p.suffix[1:]} file (CSV: a header row; JSONL: one JSON object per line).") from None
    if not rows:
        raise UserError(f"{p} holds no rows. Give at least one row under the header.")
    return Table(rows, str(p))


def read_hub(name: str, config: str | None, split: str) -> Table:
    """One split of a hub dataset, from datasets' cache (and the network only when the environment allows it)."""
    splits = hub_splits(name, config)
    if split not in splits:
        raise UserError(f"dataset {name}{f' ({config})' if config else ''} has no split {split!r} (it has: "
                        f"{', '.join(splits)}). Set data.train_split / data.eval_split to one of them.")
    rows = splits[split].to_list()
    if not rows:
        raise UserError(f"dataset {name}, split {split}, holds no rows.")
    return Table(rows, f"dataset {name}{f'/{config}' if config else ''}:{split}")


def hub_splits(name: str, config: str | None) -> dict:
    datasets = _quiet_datasets()
    try:
        return dict(datasets.load_dataset(name, config))
    except Exception as e:
        text = str(e).split("\n")[0][:300]
        raise UserError(f"cannot load dataset {name!r}{f' (config {config!r})' if config else ''}: {text}. A hub "
                        f"dataset must be in datasets' local cache (HF_DATASETS_CACHE) when offline; or write its rows "
                        f"to a file and set data.train_file.") from None


def split_off(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, validation): a fixed-seed random share of the rows held out, at least one row each side."""
    import random

    if len(rows) < 2:
        raise UserError(f"only {len(rows)} training row: too few to hold out validation rows. Add rows or give "
                        f"data.validation_file.")
    order = list(range(len(rows)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_val = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


# ---- checks -------------------------------------------------------------------------------------
def require_columns(table: Table, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"{table.where}: no column {missing[0]!r} ({what}); its columns are: {', '.join(table.columns)}. "
                        f"Name the right column in the recipe (data.text_columns, data.label_column, "
                        f"data.prompt_column, data.response_column).")


def texts(table: Table, column: str) -> list[str]:
    out = []
    for i, row in enumerate(table.rows, 1):
        value = row.get(column)
        if value is None:
            raise UserError(f"{table.where}, row {i}, column {column!r}: empty. Every row needs text there; fill or "
                            f"remove the row.")
        if not isinstance(value, str):
            raise UserError(f"{table.where}, row {i}, column {column!r}: expected text, got {value!r} "
                            f"({type(value).__name__}); the column mixes types. Quote it as text or fix the row.")
        out.append(value)
    return out


def infer_text_columns(table: Table, exclude: set[str]) -> list[str]:
    """The text columns other than ``exclude``: one or two of them, else the user must say which."""
    first = table.rows[0]
    candidates = [c for c in table.columns if c not in exclude and isinstance(first.get(c), str)]
    if not 1 <= len(candidates) <= 2:
        raise UserError(f"{table.where}: cannot tell which columns hold the text (text columns besides the label: "
                        f"{', '.join(candidates) or 'none'}). Set data.text_columns to one or two of: "
                        f"{', '.join(table.columns)}.")
    return candidates


def _label_kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return "text"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return "integer"
    return None


def class_labels(table: Table, column: str) -> list:
    """The label of each row as a class name (str) or integer; one kind for the whole column."""
    out, kind, first_row = [], None, 0
    for i, row in enumerate(table.rows, 1):
        value = row.get(column)
        this = _label_kind(value)
        if value is None or this is None:
            raise UserError(f"{table.where}, row {i}, column {column!r}: {value!r} is not a class label (class names "
                            f"or whole numbers expected; for scores set data.task_type: regression).")
        if kind is None:
            kind, first_row = this, i
        elif this != kind:
            raise UserError(f"{table.where}, row {i}, column {column!r}: {value!r} is {this} while row {first_row} "
                            f"holds {kind}: the label column mixes types. Use class names or integers throughout.")
        out.append(int(value) if this == "integer" else value)
    return out


def numeric_labels(table: Table, column: str) -> list[float]:
    out = []
    for i, row in enumerate(table.rows, 1):
        value = row.get(column)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            raise UserError(f"{table.where}, row {i}, column {column!r}: {value!r} is not a finite number, which "
                            f"data.task_type regression needs. Fix the row, or use classification for class names.")
        out.append(float(value))
    return out


def label_ids(table: Table, labels: list, names: list) -> list[int]:
    """Class ids of ``labels`` by their place in ``names`` (the training labels); an unseen one is an error."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for i, label in enumerate(labels, 1):
        if label not in index:
            raise UserError(f"{table.where}, row {i}: label {label!r} does not occur in the training rows (labels: "
                            f"{', '.join(map(str, names))}). Fix the row or add training rows with that label.")
        out.append(index[label])
    return out
