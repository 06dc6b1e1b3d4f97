"""`peftkit finetune RECIPE`: GLUE fine-tuning with any method plugin on the shared trainer, or causal-LM
fine-tuning (data.task wikitext2, see peftkit/data/lm_text.py) with full, lora or apiq."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from peftkit.errors import RunFailed, UserError


def _write_final(method, model, recipe, tokenizer, task_info: dict, run_dir: Path) -> Path:
    """Save the fine-tuned model into run_dir/final atomically (temp dir, then rename)."""
    from peftkit.models.trained import INFO_FILE

    final = run_dir / "final"
    for stale in run_dir.glob(".final-*"):  # left by an attempt killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=run_dir))
    try:
        method.save(model, tmp, recipe.method)
        tokenizer.save_pretrained(tmp)
        info = {"method": recipe.method_name, "options": recipe.to_dict()["method"] | {}, "model": recipe.to_dict()["model"],
                **task_info, "max_length": recipe.data.max_length}
        info["options"].pop("name", None)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise RunFailed(f"could not save the final model into {final}: {e.strerror or e}. The checkpoints are intact; "
                            f"free disk space (or fix permissions) and run again with train.resume=auto.") from e
        raise
    return final


def load_prepared_model(recipe, method, num_labels: int | None, problem: str | None):
    """The base model with its head (the method's own loader first), checked against data.max_length, with the
    method applied. Called before the run directory exists: a model or option that does not fit fails without
    leaving a half-written run behind."""
    from peftkit.models.load import load_model

    model = method.load_base(recipe.model, recipe.model.task_head, num_labels, problem)
    if model is None:
        model = load_model(recipe.model.name, recipe.model.task_head, num_labels, problem, recipe.model.dtype,
                           recipe.model.trust_remote_code, recipe.model.attn_implementation)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and recipe.data.max_length > limit:
        raise UserError(f"data.max_length {recipe.data.max_length} exceeds what {recipe.model.name} allows "
                        f"({limit} positions). Set data.max_length to at most {limit}.")
    return method.prepare(model, recipe.method)


@contextlib.contextmanager
def run_logger(run_dir: Path, dist):
    """A log function that prints and appends to run_dir/train.log on the main process; writes env.json."""
    from peftkit.utils.env import environment

    log_file = open(run_dir / "train.log", "a") if dist.is_main else None

    def log(msg: str) -> None:
        if dist.is_main:
            print(msg, flush=True)
            log_file.write(msg + "\n")
            log_file.flush()

    try:
        if dist.is_main:
            (run_dir / "env.json").write_text(json.dumps(environment() | {"world_size": dist.world_size}, indent=2))
        yield log
    finally:
        if log_file:
            log_file.close()


def finetune(recipe_spec: str, overrides: list[str]) -> Path:
    from peftkit.config.loader import load_recipe

    recipe = load_recipe(recipe_spec, overrides)  # every recipe error surfaces here, before heavy imports
    from peftkit.data.lm_text import is_lm_task

    if is_lm_task(recipe.data.task):  # the loader has checked that head, method and data options fit it
        from peftkit.finetune_lm import finetune_lm

        return finetune_lm(recipe)

    import torch

    from peftkit.data.glue import PadCollator, get_task, load_rows, tokenize_rows
    from peftkit.eval.glue_eval import make_eval_fn
    from peftkit.eval.metrics import baseline_metrics
    from peftkit.methods import get_method
    from peftkit.models.load import count_parameters, load_tokenizer
    from peftkit.train.distributed import init_distributed
    from peftkit.train.rundir import RunDir
    from peftkit.train.trainer import Trainer
    from peftkit.utils.seed import seed_everything

    method = get_method(recipe.method_name)
    task = get_task(recipe.data.task)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    eval_split = recipe.data.eval_split or task.validation_splits[0]
    train_rows = load_rows(task.name, recipe.data.train_split, recipe.data.root, recipe.data.limit)
    eval_rows = load_rows(task.name, eval_split, recipe.data.root, recipe.data.eval_limit)
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.trust_remote_code)
    dist = init_distributed()
    resume = recipe.train.resume

    seed_everything(recipe.train.seed)
    problem = "regression" if task.is_regression else "single_label_classification"
    model = load_prepared_model(recipe, method, task.num_labels, problem)

    with RunDir(recipe.run_dir, recipe.to_dict(), resume != "false", recipe.output.overwrite, dist.is_main) as run_dir, \
            run_logger(run_dir, dist) as log:
        trainable, total = count_parameters(model)
        log(f"method {recipe.method_name} on {recipe.model.name} / {task.name}: trainable params {trainable:,} "
            f"of {total:,} ({100 * trainable / total:.3f}%)")

        train_data = tokenize_rows(task, train_rows, tokenizer, recipe.data.max_length)
        eval_data = tokenize_rows(task, eval_rows, tokenizer, recipe.data.max_length)
        collate = PadCollator(tokenizer.pad_token_id or 0, task.is_regression)
        eval_fn = make_eval_fn(task, eval_data, collate, recipe.train.eval_batch_size)
        trainer = Trainer(model, method, recipe.train, run_dir, train_data, collate, eval_fn,
                          best_metric="glue_score", dist=dist, log=log)
        trainer.resume(resume)
        summary = trainer.train()

        final_metrics = eval_fn(trainer.raw_model)
        if dist.is_main:
            task_info = {"task": task.name, "num_labels": task.num_labels, "problem_type": problem}
            final = _write_final(method, trainer.raw_model, recipe, tokenizer, task_info, run_dir)
            baseline = baseline_metrics(task.name, [r["label"] for r in train_rows], [r["label"] for r in eval_rows])
            metrics = {"task": task.name, "method": recipe.method_name, "model": recipe.model.name, **final_metrics,
                       "trainable_params": trainable, "total_params": total,
                       "trainable_pct": 100 * trainable / total, "train_seconds": summary["train_seconds"],
                       "steps": summary["steps"], "epochs": summary["epochs"], "seed": recipe.train.seed,
                       "best_step": summary["best_step"], "eval_split": eval_split, "n_eval": len(eval_rows),
                       "baseline": baseline, "world_size": dist.world_size}
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            shown = "  ".join(f"{k} {v:.4f}" for k, v in final_metrics.items())
            log(f"final {task.name}: {shown}  (trivial baseline: "
                + "  ".join(f"{k} {v:.4f}" for k, v in baseline.items()) + f")  saved {final}")
    return run_dir
