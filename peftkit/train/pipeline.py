"""The one run pipeline: every command that trains (finetune, pretrain) is ``run_training(recipe)``, and every
command that writes a run directory (quantize too) goes through ``open_run``.

A run, in order: the task and the method are created from the recipe; the tokenizer and the data are read and
checked; the process group starts (torchrun); the seed is set and the model built; then, inside the locked run
directory (config.yaml, env.json, train.log), the trainer runs, the final model is written atomically to
final/ and the figures to metrics.json.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from peftkit.errors import RunFailed, UserError


@dataclass
class OpenRun:
    dir: Path
    log: Callable[[str], None]


def run_outputs(recipe) -> tuple[str, ...]:
    """The top-level entries a run of ``recipe`` writes beyond rundir.RUN_LAYOUT: its trackers' folders, and what
    a quantize run saves beside its config (the quantized model, its tokenizer and initial LoRA)."""
    from peftkit.train.loggers import run_dir_entries

    train = getattr(recipe, "train", None)
    names = run_dir_entries(getattr(train, "report_to", None) or [])
    if recipe.kind == "quantize":
        from peftkit.quant.checkpoint import BASE_FILE, ERRORS_FILE, INFO_FILE

        names += (BASE_FILE, INFO_FILE, ERRORS_FILE, "config.json", "adapter_config.json", "adapter_model.safetensors",
                  "README.md", *TOKENIZER_FILES)
    return names


# The files transformers' tokenizers save (save_pretrained), whichever kind the model has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


@contextlib.contextmanager
def open_run(recipe, dist=None, resume: bool = False, before_write: Callable[[Path, Callable[[str], None]], None] | None = None):
    """Create (or continue) the recipe's run directory, hold its lock, write config.yaml and env.json, and yield
    the directory with a log function that prints and appends to train.log (the main process only).

    ``before_write(dir, log)`` runs under the lock before anything is written into the directory (a check that
    may refuse the run); what it logs reaches train.log once it is open."""
    from peftkit.train.distributed import DistInfo
    from peftkit.train.rundir import RunDir
    from peftkit.utils.atomic import DISK_ERRNOS, atomic_write_json, io_error_of, open_append
    from peftkit.utils.env import environment

    dist = dist or DistInfo()
    early: list[str] = []
    check = (lambda path: before_write(path, early.append)) if before_write else None
    with RunDir(recipe.run_dir, recipe.to_dict(), resume, recipe.output.overwrite, dist.is_main,
                outputs=run_outputs(recipe), before_write=check) as run_dir:
        log_file = open_append(run_dir / "train.log") if dist.is_main else None

        def log(msg: str) -> None:
            if dist.is_main:
                print(msg, flush=True)
                log_file.write(msg + "\n")
                log_file.flush()

        try:
            for msg in early:
                log(msg)
            if dist.is_main:
                atomic_write_json(run_dir / "env.json", environment() | {"world_size": dist.world_size})
            yield OpenRun(run_dir, log)
        except Exception as e:
            cause = io_error_of(e)
            if isinstance(e, (OSError, RunFailed, UserError)) or cause is None or cause.errno not in DISK_ERRNOS:
                raise
            # a library's own words for a full disk (safetensors, torch): a failed run, not a crash
            raise RunFailed(f"cannot write into {run_dir}: {cause.strerror}. Free disk space (or fix permissions) "
                            f"and run again; a training run continues from its last checkpoint with "
                            f"train.resume=auto.") from e
        finally:
            if log_file:
                log_file.close()


def write_final(save: Callable[[Path], None], run_dir: Path) -> Path:
    """Call ``save(tmp_dir)`` and move the result to run_dir/final atomically (temp dir, then rename).

    A save that fails for want of space (or permissions) -- whether the library reports it as an OSError or
    in its own words -- is a RunFailed naming the cause; no temp dir and no partial final/ stay behind."""
    from peftkit.utils.atomic import io_error_of, replace_dir

    final = run_dir / "final"
    for stale in run_dir.glob(".final-*"):  # left by an attempt killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=run_dir))
    try:
        save(tmp)
        replace_dir(tmp, final, aside=tmp.with_name(f"{tmp.name}-old"))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = io_error_of(e) if isinstance(e, Exception) else None
        if cause is not None:
            raise RunFailed(f"could not save the final model into {final}: {cause.strerror or cause}. The checkpoints "
                            f"are intact; free disk space (or fix permissions) and run again with "
                            f"train.resume=auto.") from e
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
    from peftkit.train.trainer import Trainer, check_resumable, find_resume_checkpoint
    from peftkit.utils.atomic import atomic_write_json
    from peftkit.utils.seed import seed_everything

    task = create_task(recipe)
    method = create_recipe_method(recipe)
    task.check_method(method)  # a model the method cannot take is refused before any data is read
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

    settings_hash = settings_digest(recipe.result_settings())
    found = []  # the checkpoint to resume from, read and checked before anything is written into the run dir

    def check_resume(run_dir: Path, log: Callable[[str], None]) -> None:
        found.append(find_resume_checkpoint(run_dir / "checkpoints", train.resume, log))
        if found[0] is not None:
            check_resumable(found[0], settings_hash=settings_hash, allow_foreign=train.resume_any,
                            world_size=dist.world_size, trainable=method.trainable_state(model),
                            groups=method.param_groups(model, train.weight_decay), run_dir=run_dir,
                            method_now=recipe.to_dict().get("method"))

    with open_run(recipe, dist, resume=train.resume != "false", before_write=check_resume) as run:
        trainable, total = count_parameters(model)
        method_name = getattr(recipe, "method_name", "full")
        run.log(f"method {method_name} on {task.describe(data)}: trainable params {trainable:,} of {total:,} "
                f"({100 * trainable / total:.3f}%)" + ("; gradient checkpointing on" if checkpointing else ""))
        args = task.train_args(model, run.dir if dist.is_main else None, run.log)
        trainer = Trainer(model, method, args, run.dir, data.train, data.collate, data.eval_fn,
                          best_metric=task.best_metric if data.eval_fn else None,
                          greater_is_better=task.greater_is_better, dist=dist, log=run.log,
                          settings_hash=settings_hash)
        start = None
        if task.evaluate_start:  # before resume: the start point, whatever the checkpoints hold
            start = data.eval_fn(trainer.raw_model)
            run.log("start point: " + task.final_line(start, data))
        trainer.resume(train.resume, allow_foreign=train.resume_any, found=found[0])
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
            atomic_write_json(run.dir / "metrics.json", metrics)
            run.log(f"final {task.name}: {task.final_line(final_metrics, data)}  saved {final}")
    shutdown(dist)
    return run.dir
