"""The one run pipeline: every command that trains (finetune, pretrain) is ``run_training(recipe)``, and every
command that writes a run directory (quantize too) goes through ``open_run``.

A run, in order: the task and the method are created from the recipe; the tokenizer and the data are read and
checked; the process group starts (torchrun); the seed is set and the model built; then, inside the locked run
directory (config.yaml, env.json, train.log), the trainer runs, the final model is written atomically to
final/ and the figures to metrics.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from peftkit.errors import RunFailed


@dataclass
class OpenRun:
    dir: Path
    log: Callable[[str], None]


@contextlib.contextmanager
def open_run(recipe, dist=None, resume: bool = False):
    """Create (or continue) the recipe's run directory, hold its lock, write config.yaml and env.json, and yield
    the directory with a log function that prints and appends to train.log (the main process only)."""
    from peftkit.train.distributed import DistInfo
    from peftkit.train.rundir import RunDir
    from peftkit.utils.env import environment

    dist = dist or DistInfo()
    with RunDir(recipe.run_dir, recipe.to_dict(), resume, recipe.output.overwrite, dist.is_main) as run_dir:
        log_file = open(run_dir / "train.log", "a") if dist.is_main else None

        def log(msg: str) -> None:
            if dist.is_main:
                print(msg, flush=True)
                log_file.write(msg + "\n")
                log_file.flush()

        try:
            if dist.is_main:
                (run_dir / "env.json").write_text(json.dumps(environment() | {"world_size": dist.world_size}, indent=2))
            yield OpenRun(run_dir, log)
        finally:
            if log_file:
                log_file.close()


def write_final(save: Callable[[Path], None], run_dir: Path) -> Path:
    """Call ``save(tmp_dir)`` and move the result to run_dir/final atomically (temp dir, then rename)."""
    final = run_dir / "final"
    for stale in run_dir.glob(".final-*"):  # left by an attempt killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=run_dir))
    try:
        save(tmp)
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


def create_task(recipe):
    from peftkit.utils.registry import TASKS

    name = recipe.data.task if recipe.kind == "finetune" else "mlm"
    return TASKS.get(name)(recipe)


def create_recipe_method(recipe):
    """The recipe's method bound to its options; pretraining trains every parameter (full)."""
    from peftkit.methods import create_method

    if recipe.kind == "pretrain":
        return create_method("full")
    return create_method(recipe.method_name, recipe.method)


def run_training(recipe) -> Path:
    """Train what the recipe describes; return the run directory."""
    import torch

    from peftkit.models.load import count_parameters
    from peftkit.train.checkpoint import settings_digest
    from peftkit.train.distributed import init_distributed, shutdown
    from peftkit.train.trainer import Trainer
    from peftkit.utils.seed import seed_everything

    task = create_task(recipe)
    method = create_recipe_method(recipe)
    train = recipe.train
    if train.threads:
        torch.set_num_threads(train.threads)
    task.read_data()
    tokenizer = task.load_tokenizer()
    data = task.load_data(tokenizer)  # every data problem surfaces here, before the model loads
    dist = init_distributed()

    seed_everything(train.seed)
    model = task.build_model(method, tokenizer)
    checkpointing = train.gradient_checkpointing
    checkpointing = method.checkpoints_by_default if checkpointing is None else checkpointing
    if checkpointing:
        method.enable_gradient_checkpointing(model)

    with open_run(recipe, dist, resume=train.resume != "false") as run:
        trainable, total = count_parameters(model)
        method_name = getattr(recipe, "method_name", "full")
        run.log(f"method {method_name} on {task.describe(data)}: trainable params {trainable:,} of {total:,} "
                f"({100 * trainable / total:.3f}%)" + ("; gradient checkpointing on" if checkpointing else ""))
        args = task.train_args(model, run.dir if dist.is_main else None, run.log)
        trainer = Trainer(model, method, args, run.dir, data.train, data.collate, data.eval_fn,
                          best_metric=task.best_metric if data.eval_fn else None,
                          greater_is_better=task.greater_is_better, dist=dist, log=run.log,
                          settings_hash=settings_digest(recipe.result_settings()))
        start = None
        if task.evaluate_start:  # before resume: the start point, whatever the checkpoints hold
            start = data.eval_fn(trainer.raw_model)
            run.log("start point: " + task.final_line(start, data))
        trainer.resume(train.resume, allow_foreign=train.resume_any)
        summary = trainer.train()

        final_metrics = data.eval_fn(trainer.raw_model) if data.eval_fn else {}
        final_model = trainer.raw_model
        if trainer.sharded:  # gather the shards (every process takes part), then save a plain model from the main one
            state = trainer.full_model_state()
            if dist.is_main:
                final_model = task.build_model(method, tokenizer)
                final_model.load_state_dict(state)
        if dist.is_main:
            final = write_final(lambda d: task.save_final(method, final_model, tokenizer, d), run.dir)
            trained = {"steps": summary["steps"], "world_size": dist.world_size}
            model_name = getattr(recipe.model, "name", None) or getattr(recipe.model, "preset", None)
            metrics = {"task": task.name, "method": method_name, "model": model_name,
                       **task.summary(data, final_metrics, start, final_model, trained),
                       "trainable_params": trainable, "total_params": total, "trainable_pct": 100 * trainable / total,
                       "train_seconds": summary["train_seconds"], "steps": summary["steps"], "epochs": summary["epochs"],
                       "seed": train.seed, "best_step": summary["best_step"], "world_size": dist.world_size}
            (run.dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            run.log(f"final {task.name}: {task.final_line(final_metrics, data)}  saved {final}")
    shutdown(dist)
    return run.dir
