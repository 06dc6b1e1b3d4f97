"""GLUE: the nine tasks, where their rows come from, and how they become token ids.

Rows are read from a data root laid out as ``<root>/<task>/<split>.jsonl|tsv|parquet`` (env
PEFTKIT_DATA_DIR or ``data.root``) in the Hugging Face GLUE schema, or from the hub when no root
is set. Everything is checked on load (columns, label range) so that a bad file fails at once
with its path, not as a shape error in the middle of training.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import UserError, did_you_mean


@dataclass(frozen=True)
class GlueTask:
    name: str
    text_keys: tuple[str, ...]
    num_labels: int  # 1 = regression
    metrics: tuple[str, ...]  # metric names as GLUE reports them; the first is the headline one
    validation_splits: tuple[str, ...] = ("validation",)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", ("sentence",), 2, ("matthews_correlation",)),
    "sst2": GlueTask("sst2", ("sentence",), 2, ("accuracy",)),
    "mrpc": GlueTask("mrpc", ("sentence1", "sentence2"), 2, ("f1", "accuracy")),
    "qqp": GlueTask("qqp", ("question1", "question2"), 2, ("f1", "accuracy")),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearman")),
    "mnli": GlueTask("mnli", ("premise", "hypothesis"), 3, ("accuracy",), ("validation_matched", "validation_mismatched")),
    "qnli": GlueTask("qnli", ("question", "sentence"), 2, ("accuracy",)),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), 2, ("accuracy",)),
    "wnli": GlueTask("wnli", ("sentence1", "sentence2"), 2, ("accuracy",)),
}
FORMATS = ("jsonl", "tsv", "parquet")


def get_task(name: str) -> GlueTask:
    if name not in TASKS:
        raise UserError(f'unknown GLUE task "{name}"{did_you_mean(name, TASKS)}; known tasks: {", ".join(TASKS)}.')
    return TASKS[name]


def data_root(root: str | None) -> Path | None:
    """The configured data root: the recipe's data.root, else env PEFTKIT_DATA_DIR, else None (hub)."""
    chosen = root or os.environ.get("PEFTKIT_DATA_DIR")
    return Path(chosen).expanduser() if chosen else None


def _read_file(path: Path) -> list[dict]:
    try:
        if path.suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise UserError(f"{path}, line {line_no}: not valid JSON ({e.msg}). Each line must be one JSON object.") from None
            return rows
        if path.suffix == ".tsv":
            import csv

            with open(path, encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except UserError:
        raise
    except Exception as e:  # unreadable file of any format
        raise UserError(f"cannot read {path}: {e}. Check that it is a {path.suffix[1:]} file in the GLUE schema.") from None


def _find_split_file(root: Path, task: str, split: str) -> Path:
    for fmt in FORMATS:
        path = root / task / f"{split}.{fmt}"
        if path.is_file():
            return path
    present = sorted(p.name for p in (root / task).glob("*")) if (root / task).is_dir() else []
    hint = f"; {root / task} holds: {', '.join(present)}" if present else f"; {root / task} does not exist"
    raise UserError(
        f"no {split} split for task {task} under data root {root} (looked for {split}.jsonl, .tsv, .parquet{hint}). "
        f"Set data.root (or env PEFTKIT_DATA_DIR) to a directory laid out as <task>/<split>.jsonl."
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_from_hub(task: str, split: str) -> list[dict]:
    if not _hub_reachable():
        raise UserError(
            f"GLUE task {task} needs either a local data root or the Hugging Face hub, and the hub is not reachable "
            f"(offline). Set data.root in the recipe or env PEFTKIT_DATA_DIR to a directory laid out as "
            f"<task>/<split>.jsonl (for this project: ../shared/data/glue)."
        )
    from datasets import load_dataset

    return load_dataset("nyu-mll/glue", task, split=split).to_list()


def _label(task: GlueTask, raw) -> int | float | None:
    """The label as float (regression) or int (classes); None when it is not one (1.5, nan, 'x', True)."""
    if isinstance(raw, bool):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(value):
        return None
    if task.is_regression:
        return value
    return int(value) if value.is_integer() else None


def check_rows(task: GlueTask, rows: list[dict], where: str) -> list[dict]:
    """Validate columns and labels; return the rows with labels converted to int/float."""
    if not rows:
        raise UserError(f"{where} holds no rows. Point data.root at a non-empty GLUE directory.")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{where}, row {i + 1}: expected an object with columns, got {row!r}.")
        missing = [k for k in (*task.text_keys, "label") if k not in row]
        if missing:
            raise UserError(
                f"{where}, row {i + 1}: lacks the column(s) {', '.join(missing)} that GLUE task {task.name} needs "
                f"(found: {', '.join(map(str, row))}). Convert the file to the Hugging Face GLUE schema."
            )
        label = _label(task, row["label"])
        if label is None:
            kind = "finite" if task.is_regression else f"whole class index 0..{task.num_labels - 1}"
            raise UserError(f"{where}, row {i + 1}: label {row['label']!r} is not a number usable as a label ({kind} expected).")
        if not task.is_regression and not 0 <= label < task.num_labels:
            raise UserError(
                f"{where}, row {i + 1}: label {label} is outside 0..{task.num_labels - 1} for task {task.name} "
                f"(test splits carry -1: evaluate on a labelled split)."
            )
        for k in task.text_keys:
            if not isinstance(row[k], str):
                raise UserError(f"{where}, row {i + 1}: column {k} must be text, got {row[k]!r}.")
        out.append({**{k: row[k] for k in task.text_keys}, "label": label})
    return out


def load_rows(task_name: str, split: str, root: str | None = None, limit: int | None = None) -> list[dict]:
    """Rows of one split, validated. ``limit`` keeps the first N rows."""
    task = get_task(task_name)
    base = data_root(root)
    if base is not None:
        path = _find_split_file(base, task.name, split)
        rows, where = _read_file(path), str(path)
    else:
        rows, where = _load_from_hub(task.name, split), f"hub glue/{task.name}:{split}"
    if limit is not None:
        rows = rows[:limit]
    return check_rows(task, rows, where)


def tokenize_rows(task: GlueTask, rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Token ids per row (no padding: the collator pads each batch to its own longest row)."""
    texts = [[r[k] for r in rows] for k in task.text_keys]
    enc = tokenizer(*texts, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": rows[i]["label"]} for i in range(len(rows))]


class PadCollator:
    """Stack a list of tokenized rows into tensors, padding to the longest row of the batch."""

    def __init__(self, pad_token_id: int, regression: bool):
        self.pad_token_id = pad_token_id
        self.regression = regression

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        batch = {}
        for key, pad in (("input_ids", self.pad_token_id), ("token_type_ids", 0), ("attention_mask", 0)):
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] + [pad] * (width - len(r[key])) for r in rows], dtype=torch.long)
        dtype = torch.float32 if self.regression else torch.long
        batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=dtype)
        return batch
