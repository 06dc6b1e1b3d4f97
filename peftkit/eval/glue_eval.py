"""GLUE evaluation: predictions of a model on a tokenized split, and the `peftkit eval --task glue` table."""

from __future__ import annotations

import json
import time
from pathlib import Path

from peftkit.errors import UserError


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


def make_eval_fn(task, rows: list[dict], collate, batch_size: int):
    """A function model -> GLUE metrics on ``rows`` (used during training and for the final figures)."""
    from peftkit.eval.metrics import glue_metrics

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


def parse_task_spec(spec: str) -> tuple[str, list[str] | None]:
    """'glue' -> ('glue', None); 'glue:sst2,mrpc' -> ('glue', ['sst2', 'mrpc']); 'wikitext2' -> ('wikitext2', None)."""
    suite, _, names = spec.partition(":")
    tasks = [t.strip() for t in names.split(",") if t.strip()] or None
    return suite.strip(), tasks


def evaluate_glue(model_dirs: list[str], tasks: list[str] | None, data_root: str | None, batch_size: int = 128,
                  limit: int | None = None, json_path: str | None = None) -> dict:
    """Evaluate each model on its own GLUE task (or on ``tasks`` for a plain checkpoint); print and save a table."""
    from peftkit.bench.common import format_table
    from peftkit.data.glue import PadCollator, get_task, load_rows, tokenize_rows
    from peftkit.models.trained import load_trained

    rows_out = []
    for model_dir in model_dirs:
        model, tokenizer, info = load_trained(model_dir)
        own_task = info.get("task")
        wanted = tasks or ([own_task] if own_task else None)
        if not wanted:
            raise UserError(f"{model_dir} does not record its task; name one with --task glue:<task>.")
        for name in wanted:
            task = get_task(name)
            if own_task and name != own_task:
                raise UserError(f"{model_dir} was fine-tuned on {own_task}, not {name}; its head does not fit {name}. "
                                f"Evaluate it with --task glue:{own_task}.")
            split = task.validation_splits[0]
            rows = load_rows(name, split, data_root, limit)
            data = tokenize_rows(task, rows, tokenizer, info.get("max_length", 128))
            collate = PadCollator(tokenizer.pad_token_id or 0, task.is_regression)
            start = time.perf_counter()
            metrics = make_eval_fn(task, data, collate, batch_size)(model)
            rows_out.append({"model": str(model_dir), "task": name, **{k: round(v, 4) for k, v in metrics.items()},
                             "n": len(rows), "seconds": round(time.perf_counter() - start, 2)})
    scores = [sum(v for k, v in r.items() if k in ("accuracy", "f1", "pearson", "spearman", "matthews_correlation"))
              / max(1, sum(k in ("accuracy", "f1", "pearson", "spearman", "matthews_correlation") for k in r)) for r in rows_out]
    average = sum(scores) / len(scores) if scores else None
    print(format_table(rows_out))
    if average is not None:
        print(f"average (mean of each task's metrics): {average:.4f}")
    import sys

    from peftkit.bench.common import machine_info

    payload = {"bench": "glue-eval", "suite": "glue", "machine": machine_info(),
               "command": " ".join(["peftkit", *sys.argv[1:]]), "rows": rows_out, "average": average}
    targets = [Path(json_path)] if json_path else []
    for model_dir in model_dirs:
        run = Path(model_dir)
        if (run / "final").is_dir():
            targets.append(run / "eval" / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(payload, indent=2))
    return payload
