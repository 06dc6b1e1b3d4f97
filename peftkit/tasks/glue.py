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
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import UserError, did_you_mean
from peftkit.paths import glue_root
from peftkit.tasks.base import Task, TaskData
from peftkit.utils.registry import TASKS


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


TASKS_BY_NAME: dict[str, GlueTask] = {
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
# Class names in label order, as the GLUE datasets name them (an exported model's id2label).
LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"), "stsb": ("similarity",),
    "mnli": ("entailment", "neutral", "contradiction"), "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"), "wnli": ("not_entailment", "entailment"),
}
FORMATS = ("jsonl", "tsv", "parquet")


def get_task(name: str) -> GlueTask:
    if name not in TASKS_BY_NAME:
        raise UserError(f'unknown GLUE task "{name}"{did_you_mean(name, TASKS_BY_NAME)}; '
                        f'known tasks: {", ".join(TASKS_BY_NAME)}.')
    return TASKS_BY_NAME[name]


def data_root(root: str | None) -> Path | None:
    """The configured data root: the recipe's data.root, else env PEFTKIT_DATA_DIR, else None (hub)."""
    chosen = root or glue_root()
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


def _load_from_hub(task: str, split: str) -> list[dict]:
    """A split of nyu-mll/glue through datasets' own cache (offline with HF_DATASETS_OFFLINE=1)."""
    from peftkit.tasks.tabular import read_hub

    try:
        return read_hub("nyu-mll/glue", task, split).rows
    except UserError as e:
        raise UserError(f"GLUE task {task} needs either a local data root or the dataset nyu-mll/glue in datasets' "
                        f"cache: {e} Set data.root in the recipe or env PEFTKIT_DATA_DIR to a directory laid out as "
                        f"<task>/<split>.jsonl.") from None


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
        if "labels" in rows[0]:  # rows to label (predict) have none
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.float32 if self.regression else torch.long)
        return batch


def predict(model, rows: list[dict], collate, batch_size: int, regression: bool):
    """Predictions (class ids, or scores for regression) for tokenized ``rows``, in order."""
    import torch

    device = next(model.parameters()).device
    preds = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size])
            batch.pop("labels", None)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            preds.extend(logits[:, 0].tolist() if regression else logits.argmax(-1).tolist())
    return preds


def make_eval_fn(task: GlueTask, rows: list[dict], collate, batch_size: int):
    """A function model -> GLUE metrics on ``rows`` (used during training and for the final figures)."""
    from peftkit.tasks.metrics import glue_metrics

    labels = [r["labels"] for r in rows]

    def evaluate(model) -> dict:
        was_training = model.training
        model.eval()
        try:
            preds = predict(model, rows, collate, batch_size, task.is_regression)
        finally:
            model.train(was_training)
        metrics = glue_metrics(task.name, preds, labels)
        # GLUE's per-task score: the mean of the task's metrics. Selecting checkpoints on MRPC's F1 alone
        # would prefer the degenerate "always paraphrase" model (F1 0.81 at accuracy 0.68).
        metrics["glue_score"] = sum(metrics.values()) / len(metrics)
        return metrics

    return evaluate


@TASKS.register(*TASKS_BY_NAME, help="GLUE classification / regression (accuracy, F1, Pearson, Matthews).")
class GlueFinetuning(Task):
    """Fine-tuning on one GLUE task; checkpoints are selected on the task's GLUE score (higher is better)."""

    best_metric = "glue_score"
    greater_is_better = True
    eval_suite = "glue"

    @classmethod
    def recipe_problems(cls, recipe) -> list[str]:
        if recipe.model.task_head == "causal_lm":
            return [f"model.task_head: causal_lm needs a language-modelling data.task (wikitext2), not the GLUE task "
                    f"{recipe.data.task!r}; GLUE uses seq_cls"]
        return []

    def __init__(self, recipe):
        super().__init__(recipe)
        self.task = get_task(recipe.data.task)
        self.name = self.task.name
        self.eval_split = recipe.data.eval_split or self.task.validation_splits[0]

    def head(self):
        return self.task.num_labels, "regression" if self.task.is_regression else "single_label_classification"

    def read_data(self) -> None:
        d = self.recipe.data
        self.rows = (load_rows(self.task.name, d.train_split, d.root, d.limit),
                     load_rows(self.task.name, self.eval_split, d.root, d.eval_limit))

    def load_data(self, tokenizer) -> TaskData:
        d = self.recipe.data
        train_rows, eval_rows = self.rows
        train = tokenize_rows(self.task, train_rows, tokenizer, d.max_length)
        evaluation = tokenize_rows(self.task, eval_rows, tokenizer, d.max_length)
        collate = PadCollator(tokenizer.pad_token_id or 0, self.task.is_regression)
        eval_fn = make_eval_fn(self.task, evaluation, collate, self.recipe.train.eval_batch_size)
        from peftkit.tasks.metrics import baseline_metrics

        baseline = baseline_metrics(self.task.name, [r["label"] for r in train_rows], [r["label"] for r in eval_rows])
        return TaskData(train, collate, eval_fn, {"n_eval": len(eval_rows), "baseline": baseline})

    def save_final(self, method, model, tokenizer, directory, task_info=None) -> None:
        num_labels, problem = self.head()
        super().save_final(method, model, tokenizer, directory,
                           {"task": self.task.name, "num_labels": num_labels, "problem_type": problem})

    def summary(self, data, final, start, model, trained) -> dict:
        return {**final, "eval_split": self.eval_split, **data.info}

    def final_line(self, final, data) -> str:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in final.items())
        base = "  ".join(f"{k} {v:.4f}" for k, v in data.info["baseline"].items())
        return f"{shown}  (trivial baseline: {base})"

    # ---- `peftkit eval --task glue[:TASK,...]` ---------------------------------------------------------
    @classmethod
    def evaluate_run(cls, model, tokenizer, info, data, request, model_dir) -> list[dict]:
        """The run on its own GLUE task (or on the named tasks, for a checkpoint that does not record one), on
        each task's first validation split."""
        import time

        own_task = info.task if info is not None else None
        wanted = request.names or ([own_task] if own_task else None)
        if not wanted:
            raise UserError(f"{model_dir} does not record its task; name one with --task glue:<task>.")
        max_length = (info.max_length if info is not None else None) or 128
        rows_out = []
        for name in wanted:
            task = get_task(name)
            if own_task and name != own_task:
                raise UserError(f"{model_dir} was fine-tuned on {own_task}, not {name}; its head does not fit {name}. "
                                f"Evaluate it with --task glue:{own_task}.")
            if not own_task:  # a plain checkpoint: its config's head must fit the task
                check_head_fits(model, task, model_dir)
            rows = load_rows(name, task.validation_splits[0], request.data_root, request.limit)
            encoded = tokenize_rows(task, rows, tokenizer, max_length)
            collate = PadCollator(tokenizer.pad_token_id or 0, task.is_regression)
            start = time.perf_counter()
            metrics = make_eval_fn(task, encoded, collate, request.batch_size)(model)
            rows_out.append({"model": str(model_dir), "task": name, **{k: round(v, 4) for k, v in metrics.items()},
                             "n": len(rows), "seconds": round(time.perf_counter() - start, 2)})
        return rows_out

    @classmethod
    def eval_report(cls, rows, data, request) -> dict:
        """The table, and the average over the rows of each row's mean metric."""
        import sys

        from peftkit.utils.tables import format_table, machine_info

        scores = [sum(v for k, v in r.items() if k in SCORED) / max(1, sum(k in SCORED for k in r)) for r in rows]
        average = sum(scores) / len(scores) if scores else None
        print(format_table(rows))
        if average is not None:
            print(f"average (mean of each task's metrics): {average:.4f}")
        return {"bench": "glue-eval", "suite": "glue", "machine": machine_info(),
                "command": " ".join(["peftkit", *sys.argv[1:]]), "rows": rows, "average": average}


SCORED = ("accuracy", "f1", "pearson", "spearman", "matthews_correlation")  # the metrics a GLUE score averages


def check_head_fits(model, task: GlueTask, model_dir) -> None:
    """A checkpoint that does not record its task (a plain transformers one) against the GLUE ``task`` asked for: its
    head must have the task's number of outputs (1 = a regression score), or its scores would be meaningless."""
    outputs = getattr(model.config, "num_labels", None)
    if outputs == task.num_labels:
        return
    needs = "1 output (a regression score)" if task.num_labels == 1 else f"{task.num_labels} outputs (one per class)"
    labels = getattr(model.config, "id2label", None) or {}
    has = f"{outputs} output(s)" + (f" ({', '.join(str(v) for v in labels.values())})" if labels else "")
    raise UserError(f"{model_dir} is a checkpoint without peftkit metadata whose classification head has {has}, and "
                    f"{task.name} needs {needs}: its head does not fit {task.name}. Evaluate it on a task with "
                    f"{outputs} output(s), or fine-tune it for {task.name} with peftkit finetune first.")
