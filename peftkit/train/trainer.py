"""The one training loop every method shares.

What it guarantees:
* the same data order, dropout and updates for the same seed, and ``train.resume=auto`` that continues
  from the latest complete checkpoint to bit-identical final weights (CPU): the data order of an epoch
  is a permutation drawn from ``seed + epoch``, and checkpoints hold optimizer, scheduler, RNG states
  and the position in the data;
* atomic checkpoints (see checkpoint.py), the best evaluated state kept apart from the rolling ones;
* a NaN/inf guard that stops with the step number and leaves the last good checkpoint in place;
* SIGINT/SIGTERM: a checkpoint at the next step boundary, then ``Interrupted`` (exit code 130);
* the same code under ``torchrun`` (DDP; rank 0 logs and saves).
The method plugin supplies parameter groups, the loss and an after-step hook; see methods/base.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from peftkit.errors import RunFailed
from peftkit.train import checkpoint as ckpt
from peftkit.train.distributed import (
    DistInfo,
    barrier,
    default_device,
    full_tensors,
    load_method_state,
    load_optimizer_state,
    shard_model,
)
from peftkit.train.schedule import make_scheduler
from peftkit.utils.atomic import atomic_write_text, open_append
from peftkit.utils.env import resolve_precision


def adamw_kernel(groups) -> dict:
    """{'fused': True} where torch has a fused AdamW kernel for every parameter's device (CPU and CUDA in torch >= 2.4:
    one kernel per parameter instead of a dozen elementwise ops), else {'foreach': True} on CUDA, else {} (torch's
    own choice). Sharded (DTensor) parameters keep torch's choice."""
    import torch

    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        fused_devices = set(_get_fused_kernels_supported_devices())
    except ImportError:
        fused_devices = set()
    params = [p for group in groups for p in group["params"]]
    plain = all(type(p) is torch.nn.Parameter and p.is_floating_point() for p in params)
    if plain and params and all(p.device.type in fused_devices for p in params):
        return {"fused": True}
    if plain and params and all(p.device.type == "cuda" for p in params):
        return {"foreach": True}
    return {}


def make_optimizer(options, groups):
    """AdamW over the method's parameter groups: torch's (fused where it has the kernel, adamw_kernel), or
    bitsandbytes' 8-bit one (``train.optimizer``)."""
    import torch

    kwargs = {"lr": options.lr, "betas": tuple(options.adam_betas), "eps": options.adam_eps}
    if options.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            from peftkit.errors import UserError

            raise UserError(f"train.optimizer: adamw8bit needs bitsandbytes, which cannot be imported ({e}). "
                            f"Install it (pip install bitsandbytes) or use train.optimizer=adamw.") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs, **adamw_kernel(groups))


def matmul_shapes(model, options, dataset: Sequence[dict]) -> tuple[int, int, int] | None:
    """(rows, hidden, intermediate) of the model's typical matmul in this run, for precision 'auto' to time: rows =
    batch size x the longest of the first rows' sequences (128 where the data holds no input_ids); None where the
    model's config names no hidden size."""
    config = getattr(model, "config", None)
    hidden = next((getattr(config, name) for name in ("hidden_size", "n_embd", "d_model")
                   if isinstance(getattr(config, name, None), int)), None)
    if hidden is None:
        return None
    intermediate = next((getattr(config, name) for name in ("intermediate_size", "ffn_dim", "n_inner")
                         if isinstance(getattr(config, name, None), int)), 4 * hidden)
    first = (dataset[i] for i in range(min(64, len(dataset))))
    lengths = [len(row["input_ids"]) for row in first if isinstance(row, dict) and "input_ids" in row]
    return options.batch_size * (max(lengths) if lengths else 128), hidden, intermediate


RESUME_KEYS = ("step", "epoch", "batch_in_epoch", "best_value", "best_step", "python_rng")


def _read_resume_checkpoint(path: Path) -> tuple:
    from peftkit.errors import UserError

    try:
        return ckpt.read_checkpoint(path, RESUME_KEYS)
    except ckpt.CheckpointDamaged as e:
        raise UserError(f"cannot resume from {path}: {e}. Use train.resume=auto to continue from the newest "
                        f"good checkpoint, or point train.resume at another one.") from None


def find_resume_checkpoint(ckpt_dir: Path, spec: str, log: Callable[[str], None]) -> tuple | None:
    """(path, tensors, torch_state, state) of the checkpoint ``train.resume`` names, or None: 'auto' = the newest
    good one in ``ckpt_dir`` (damaged newer ones are passed over with a log line), 'false' = none, else a path
    (damaged: a UserError)."""
    if spec == "false":
        return None
    if spec == "auto":
        return ckpt.read_latest_good(ckpt_dir, log, RESUME_KEYS)
    return (Path(spec), *_read_resume_checkpoint(Path(spec)))


def check_resumable(found: tuple, *, settings_hash: str | None, allow_foreign: bool, world_size: int,
                    trainable: dict, groups: list[dict], run_dir: Path | None = None,
                    method_now: dict | None = None) -> bool:
    """Refuse a checkpoint this run cannot continue from, before anything is loaded or written; return True
    when it was written with other result-changing settings (allowed by ``allow_foreign``).

    Exit 2 (UserError): other settings without ``allow_foreign``; trained state of another method or
    another shape (``trainable``: this run's method state, ``groups``: its optimizer parameter groups),
    which even train.resume_any cannot continue. Exit 1 (RunFailed): another number of processes.
    """
    from peftkit.errors import UserError

    path, tensors, torch_state, state = found
    theirs = state.get("settings_hash")
    foreign = bool(settings_hash and theirs and theirs != settings_hash)
    if foreign and not allow_foreign:
        raise UserError(f"cannot resume from {path}: it was written with different result-changing settings "
                        f"(checkpoint settings {theirs}, this recipe {settings_hash}). Resume with the "
                        f"recipe that wrote it, start a new output.dir, or set train.resume_any=true to "
                        f"continue anyway.")
    misfit = _state_misfit(tensors, trainable) or _groups_misfit(torch_state.get("optimizer"), groups)
    if misfit:
        method_then = _previous_method(run_dir)
        changed = [f"method.{k}: {method_then.get(k)!r} in that run, {method_now.get(k)!r} now"
                   for k in sorted(set(method_then) | set(method_now or {}))
                   if method_now is not None and method_then and method_then.get(k) != method_now.get(k)]
        raise UserError(
            f"cannot resume from {path}: its trained state does not fit this recipe's model and method ({misfit}"
            + (f"; {', '.join(changed)}" if changed else "") + "). train.resume_any continues a run with other "
            f"training settings (learning rate, schedule, steps), not with another method or another shape of "
            f"trained state. Resume with the method options that wrote it, or start a new output.dir "
            f"(output.overwrite=true replaces this run).")
    if state.get("world_size", 1) != world_size:
        raise RunFailed(f"checkpoint {path} was written by {state.get('world_size')} processes, this run has "
                        f"{world_size}; resume with the same number of processes.")
    return foreign


def _state_misfit(tensors: dict, trainable: dict) -> str | None:
    """What keeps a checkpoint's trained tensors from loading into this model's trainable state, or None."""
    extra = sorted(set(tensors) - set(trainable))
    missing = sorted(set(trainable) - set(tensors))
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"{len(extra)} tensor(s) of the checkpoint are not trained here, e.g. {extra[0]}")
        if missing:
            parts.append(f"{len(missing)} tensor(s) trained here are not in the checkpoint, e.g. {missing[0]}")
        return "; ".join(parts)
    for name in sorted(tensors):
        theirs, ours = tuple(tensors[name].shape), tuple(trainable[name].shape)
        if theirs != ours:
            return f"{name} has shape {list(theirs)} in the checkpoint and {list(ours)} here"
    return None


def _groups_misfit(optimizer_state, groups: list[dict]) -> str | None:
    if not isinstance(optimizer_state, dict) or "param_groups" not in optimizer_state:
        return None
    theirs = [len(g.get("params", ())) for g in optimizer_state["param_groups"]]
    ours = [len(g["params"]) for g in groups]
    if theirs != ours:
        return f"the checkpoint's optimizer has parameter groups of {theirs} tensors, this run's of {ours}"
    return None


def _previous_method(run_dir: Path | None) -> dict:
    """The method section of the config.yaml the run directory holds (what wrote its checkpoints), or {}."""
    if run_dir is None:
        return {}
    method = _read_config(Path(run_dir) / "config.yaml").get("method")
    return method if isinstance(method, dict) else {}


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class Interrupted(Exception):
    """Training was stopped by SIGINT/SIGTERM after saving a checkpoint (exit code 130)."""

    exit_code = 130


class Trainer:
    def __init__(self, model, method, options, run_dir: Path, train_dataset: Sequence[dict], collate_fn: Callable,
                 eval_fn: Callable | None = None, best_metric: str | None = None, greater_is_better: bool = True,
                 dist: DistInfo | None = None, log: Callable[[str], None] | None = None,
                 settings_hash: str | None = None):
        self.raw_model = model
        self.settings_hash = settings_hash  # of the settings that change the result; stored in every checkpoint
        self.method = method
        self.opt = options
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.dataset = train_dataset
        self.collate = collate_fn
        self.eval_fn = eval_fn
        self.best_metric = best_metric
        self.greater_is_better = greater_is_better
        self.dist = dist or DistInfo()
        self.log = log or (lambda msg: print(msg, flush=True))
        self._stop_signal: int | None = None
        self._epoch_ended = False
        self._reporters = None
        self.grad_norm: float | None = None

        self.device = default_device(self.dist)
        self.raw_model.to(self.device)
        self.model = self.raw_model
        self.sharded = self.dist.enabled and options.strategy == "fsdp"
        if self.sharded:
            shard_model(self.raw_model, method, options)
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.raw_model, device_ids=ids)

        import torch

        groups = method.param_groups(self.raw_model, options.weight_decay)
        if not groups:
            raise RunFailed(f"method {method.name!r} left no parameter trainable; nothing to train.")
        self.optimizer = make_optimizer(options, groups)
        self.precision, why = resolve_precision(
            options.precision, matmul_shapes(self.raw_model, options, train_dataset) if options.precision == "auto" else None)
        if self.dist.enabled and options.precision == "auto":  # processes timed apart may differ: the main one decides
            decided = [self.precision, why]
            torch.distributed.broadcast_object_list(decided, src=0)
            self.precision, why = decided
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # fp16's narrow range needs the loss scaled (and the gradients unscaled before clipping); bf16 does not
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        if options.precision != "fp32":
            self.log(f"precision {self.precision} ({why})")
        self._compile_unproven = options.compile is True and self._compile_model()
        self._compile_trial, self._compile_pending = None, options.compile == "auto"  # decided at the first step
        shard = len(train_dataset) // self.dist.world_size
        if shard == 0:
            raise RunFailed(f"the training set has {len(train_dataset)} rows, fewer than the {self.dist.world_size} processes.")
        self.batches_per_epoch = math.ceil(shard / options.batch_size)
        self.total_steps = options.max_steps or max(1, math.ceil(options.epochs * self.batches_per_epoch / options.grad_accum))
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, options.warmup_ratio, options.schedule)

        # progress
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.last_checkpoint: Path | None = None
        self._order: list[int] | None = None
        self._order_epoch = -1

    # ---- data ---------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[int]:
        """This process's example order for ``epoch``: a seeded permutation, optionally length-grouped.

        Length grouping sorts each window of 50 batches by length and shuffles the batches, so padding
        (most of the cost on CPU for short GLUE sentences) shrinks while batches stay random.
        """
        import torch

        if self._order_epoch != epoch:
            g = torch.Generator().manual_seed(self.opt.seed * 100_003 + epoch)
            perm = torch.randperm(len(self.dataset), generator=g).tolist()
            usable = (len(perm) // self.dist.world_size) * self.dist.world_size
            order = perm[:usable][self.dist.rank :: self.dist.world_size]
            if self.opt.group_by_length and "input_ids" in self.dataset[0]:
                b = self.opt.batch_size
                window = 50 * b
                grouped = []
                for start in range(0, len(order), window):
                    chunk = sorted(order[start : start + window], key=lambda i: -len(self.dataset[i]["input_ids"]))
                    grouped += [chunk[j : j + b] for j in range(0, len(chunk), b)]
                shuffle = torch.randperm(len(grouped), generator=g).tolist()
                order = [i for k in shuffle for i in grouped[k]]
            self._order = order
            self._order_epoch = epoch
        return self._order  # type: ignore[return-value]

    def _next_batch(self) -> dict:
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        order = self._epoch_order(self.epoch)
        b = self.opt.batch_size
        idx = order[self.batch_in_epoch * b : (self.batch_in_epoch + 1) * b]
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.batches_per_epoch:
            self._epoch_ended = True
        batch = self.collate([self.dataset[i] for i in idx])
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}

    # ---- checkpoints ---------------------------------------------------------------------------
    def _torch_state(self) -> dict:
        import torch

        state = {"optimizer": self._optimizer_state(), "scheduler": self.scheduler.state_dict(),
                 "rng_cpu": torch.get_rng_state()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _state(self) -> dict:
        py_state = random.getstate()
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "total_steps": self.total_steps, "best_value": self.best_value, "best_step": self.best_step,
                "python_rng": [py_state[0], list(py_state[1]), py_state[2]], "world_size": self.dist.world_size,
                "settings_hash": self.settings_hash}

    def _optimizer_state(self) -> dict:
        """The optimizer's state dict; under FSDP with every sharded moment gathered whole (a collective)."""
        state = self.optimizer.state_dict()
        if self.sharded:
            state["state"] = {i: full_tensors(moments) for i, moments in state["state"].items()}
        return state

    def _trainable_state(self) -> dict:
        """The method's state; under FSDP gathered whole (every process takes part), so checkpoints stay one file
        set that any number of processes can resume."""
        state = self.method.trainable_state(self.raw_model)
        return full_tensors(state) if self.sharded else state

    def full_model_state(self) -> dict:
        """Every parameter and buffer gathered whole on the CPU (a collective under FSDP; the main process gets it)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(self.raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_checkpoint(self) -> Path | None:
        tensors = self._trainable_state()
        torch_state = self._torch_state()  # collectives under FSDP: before the main-process-only write
        if self.dist.is_main:
            target = self.ckpt_dir / f"step-{self.step:06d}"
            ckpt.write_checkpoint(target, tensors, torch_state, self._state())
            ckpt.prune(self.ckpt_dir, self.opt.keep_last)
            self.last_checkpoint = target
        barrier(self.dist)
        return self.last_checkpoint

    def resume_from(self, path: Path, allow_foreign: bool = False, loaded: tuple | None = None) -> None:
        """Continue from checkpoint ``path`` (``loaded``: its already verified contents). A checkpoint written
        with other result-changing settings (settings_hash) is refused unless ``allow_foreign``; then the run
        continues with this recipe's optimizer settings and schedule (learning rate, betas, weight decay,
        warmup, decay), applied to the loaded optimizer and scheduler state."""
        import torch

        if loaded is None:
            loaded = _read_resume_checkpoint(Path(path))
        tensors, torch_state, state = loaded
        foreign = check_resumable((Path(path), *loaded), settings_hash=self.settings_hash,
                                  allow_foreign=allow_foreign, world_size=self.dist.world_size,
                                  trainable=self.method.trainable_state(self.raw_model),
                                  groups=self.optimizer.param_groups, run_dir=self.run_dir)
        if foreign:
            self.log(f"warning: resuming from {path}, written with other settings ({state.get('settings_hash')}, now "
                     f"{self.settings_hash}), because train.resume_any=true; continuing with this recipe's settings")
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        base_lrs = list(self.scheduler.base_lrs)
        self._load_state(tensors, torch_state["optimizer"])
        self.scheduler.load_state_dict(torch_state["scheduler"])
        if foreign:  # the checkpoint's state (moments, step counts) with this recipe's settings
            self._apply_settings(settings, base_lrs)
        if self.scaler and "scaler" in torch_state:
            self.scaler.load_state_dict(torch_state["scaler"])
        torch.set_rng_state(torch_state["rng_cpu"])
        if "rng_cuda" in torch_state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(torch_state["rng_cuda"])
        py = state["python_rng"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.last_checkpoint = Path(path)
        self._truncate_metrics_log()
        self.log(f"resumed from {path} at step {self.step}/{self.total_steps}")

    def _apply_settings(self, settings: list[dict], base_lrs: list[float]) -> None:
        """Put this recipe's optimizer hyperparameters and peak learning rates back after loading a checkpoint's
        state, and set each group's learning rate to what this recipe's schedule gives at the loaded step
        (loading restores the checkpoint's: the run would train at the old rate while config.yaml says the new)."""
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
        self.scheduler.base_lrs = base_lrs
        step = self.scheduler.last_epoch
        for group, base, factor in zip(self.optimizer.param_groups, base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * factor(step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _load_state(self, tensors: dict, optimizer_state: dict | None) -> None:
        """Put a checkpoint's method state (and optimizer state) back; under FSDP each process keeps its shard."""
        if not self.sharded:
            self.method.load_trainable_state(self.raw_model, {k: v.to(self.device) for k, v in tensors.items()})
            if optimizer_state is not None:
                self.optimizer.load_state_dict(optimizer_state)
            return
        load_method_state(self.method, self.raw_model, tensors, self.device)
        if optimizer_state is not None:
            load_optimizer_state(self.optimizer, optimizer_state)

    def resume(self, spec: str, allow_foreign: bool = False, found: tuple | None | object = ...) -> None:
        """Apply ``train.resume``: 'auto' = the latest good checkpoint if any (damaged newer ones are passed over
        with a warning), 'false' = none, else a path. ``allow_foreign``: see resume_from. ``found``: what
        find_resume_checkpoint already returned for ``spec`` (the run pipeline reads it before writing)."""
        if found is ...:
            found = find_resume_checkpoint(self.ckpt_dir, spec, self.log)
        if found is not None:
            self.resume_from(found[0], allow_foreign, loaded=found[1:])
        elif spec == "auto":
            self.log("train.resume=auto: no usable checkpoint yet, starting fresh")

    def latest_checkpoint(self) -> Path | None:
        """The newest complete step checkpoint (sizes checked, checksums not: see ckpt.read_latest_good)."""
        found = ckpt.step_checkpoints(self.ckpt_dir)
        return found[-1] if found else None

    def _truncate_metrics_log(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        if not self.dist.is_main or not os.path.lexists(path):
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # the last line of a killed run may be cut short
                continue
            if isinstance(row, dict) and row.get("step", 0) <= self.step:
                keep.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in keep), what="the metrics log")

    # ---- logging -------------------------------------------------------------------------------
    def _record(self, row: dict) -> None:
        if self.dist.is_main:
            with open_append(self.run_dir / "metrics.jsonl", "the metrics log") as f:
                f.write(json.dumps(row) + "\n")
            if self._reporters is not None:
                self._reporters.record(row)

    @contextlib.contextmanager
    def _reporting(self):
        """train.report_to's trackers (main process), open while train() runs; they get every _record row."""
        from peftkit.train.loggers import reporting

        names = getattr(self.opt, "report_to", None) if self.dist.is_main else None
        config_file = self.run_dir / "config.yaml"
        config = _read_config(config_file) if names and config_file.is_file() else {}
        with reporting(names or [], self.run_dir, config) as self._reporters:
            try:
                yield
            finally:
                self._reporters = None

    def _grad_norm(self) -> float | None:
        """The global gradient norm of the last step: the clipping's, else computed from the (unclipped) grads."""
        if self.grad_norm is not None or self.opt.max_grad_norm:
            return self.grad_norm
        import torch

        grads = [p.grad for p in self.raw_model.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) \
            if grads else None

    def _evaluate(self) -> dict | None:
        if self.eval_fn is None:
            return None
        was_training = self.raw_model.training
        self.raw_model.eval()
        try:
            metrics = self.eval_fn(self.raw_model)
        finally:
            self.raw_model.train(was_training)
        self._record({"step": self.step, "epoch": self.epoch, "eval": metrics})
        if self.dist.is_main:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            self.log(f"eval step {self.step}: {shown}")
        value = metrics.get(self.best_metric) if self.best_metric else None
        if value is not None and (self.best_value is None or
                                  (value > self.best_value if self.greater_is_better else value < self.best_value)):
            self.best_value, self.best_step = value, self.step
            tensors = self._trainable_state()
            if self.dist.is_main:
                ckpt.write_checkpoint(self.ckpt_dir / "best", tensors, {}, {"step": self.step, self.best_metric: value})
        return metrics

    # ---- signals -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signals(self):
        def handler(signum, frame):
            self._stop_signal = signum

        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # ---- compilation (train.compile) ------------------------------------------------------------
    def _compile_model(self) -> bool:
        """torch.compile the model's forward in place (inductor; its C++ backend on a CPU), so the module, its
        attributes and its state-dict keys stay the same; autograd runs the compiled backward. False (eager, with one
        log line) for a method that declares it cannot be compiled (``compile_refusal``: e.g. a custom
        autograd.Function that frees activations itself) or where torch.compile refuses at once."""
        refusal = self.method.compile_refusal
        if refusal:
            self.log(f"train.compile: running eager: method {self.method.name!r} cannot be compiled ({refusal})")
            return False
        try:
            self.raw_model.compile(options={"fallback_random": True})  # dropout draws as eager: same seed, same masks
        except Exception as e:  # any refusal here only costs the speed-up
            self.log(f"train.compile: running eager: torch.compile failed ({_first_line(e)})")
            return False
        return True

    def _run_eager(self, error: BaseException) -> None:
        self.raw_model._compiled_call_impl = None  # what Module.compile() set; None = the plain forward
        self.log(f"train.compile: running eager: compiling the model failed ({type(error).__name__}: "
                 f"{_first_line(error)})")

    # ---- the loop ------------------------------------------------------------------------------
    def optimizer_step(self, batches) -> tuple[float, int]:
        """One optimizer step over ``grad_accum`` micro-batches: the loss, backward, clipping, AdamW, schedule and
        the method's after-step hook. Returns (mean loss, rows). This is the step every run takes and every bench
        times. Under train.compile the first step compiles (forward, then backward); where that fails the step is
        taken again eagerly from the same gradients and random state. Under train.compile=auto the first steps
        decide whether to compile (compile_auto.CompileTrial)."""
        if self._compile_pending:
            from peftkit.train.compile_auto import trial_or_none

            self._compile_pending = False
            self._compile_trial = trial_or_none(
                self.opt.compile, self.total_steps - self.step, self.dist.enabled, self.log,
                step=self._compiling_step, compile_model=self._start_compiling, run_eager=self._stop_compiling,
                compiled=lambda: self.raw_model._compiled_call_impl is not None)
        if self._compile_trial is not None and not self._compile_trial.decided:
            return self._compile_trial.step(batches)
        return self._compiling_step(batches)

    def _start_compiling(self) -> bool:
        self._compile_unproven = self._compile_model()
        return self._compile_unproven

    def _stop_compiling(self) -> None:
        self.raw_model._compiled_call_impl = None  # what Module.compile() set; None = the plain forward

    def _compiling_step(self, batches) -> tuple[float, int]:
        if not self._compile_unproven:
            return self._optimizer_step(batches)
        import torch

        batches = list(batches)
        rng = torch.get_rng_state()
        try:
            result = self._optimizer_step(batches)
        except Exception as e:
            if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            self._run_eager(e)
            torch.set_rng_state(rng)
            result = self._optimizer_step(batches)
        self._compile_unproven = False
        return result

    def _optimizer_step(self, batches) -> tuple[float, int]:
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        loss_total, rows = 0.0, 0
        for micro, batch in enumerate(batches):
            sync = (not self.dist.enabled) or micro == self.opt.grad_accum - 1
            if self.sharded:  # FSDP2: reduce-scatter gradients only on the last micro-batch
                self.model.set_requires_gradient_sync(sync)
            with (contextlib.nullcontext() if sync or self.sharded else self.model.no_sync()):
                with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                    try:
                        loss = self.method.compute_loss(self.model, batch)
                    except FloatingPointError as e:  # a model that checks its own activations (MEFT's exact streams)
                        raise RunFailed(self._nan_message(str(e))) from None
                if not torch.isfinite(loss):
                    raise RunFailed(self._nan_message(f"the loss is {float(loss)} (not finite)"))
                scaled = loss / self.opt.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_total += loss.item() / self.opt.grad_accum
            rows += len(batch["labels"]) if "labels" in batch else self.opt.batch_size
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        self.grad_norm = None
        if self.opt.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.opt.max_grad_norm)
            if not torch.isfinite(norm) and not self.scaler:  # with a scaler, an overflow only skips this step
                raise RunFailed(self._nan_message(f"the gradient norm is {float(norm)} (not finite)"))
            self.grad_norm = float(norm)  # before clipping, as the clipping saw it
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.method.after_optimizer_step(self.raw_model)
        return loss_total, rows

    @classmethod
    def stepper(cls, model, method, options) -> "Trainer":
        """A trainer that only steps on batches it is handed (``optimizer_step``): what benches time."""
        return cls(model, method, options, Path("."), [{}], lambda rows: rows[0], log=lambda msg: None)

    def train(self) -> dict:

        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model.train()
        eval_every = self.opt.eval_every
        save_every = self.opt.save_every or eval_every
        start_time, start_step = time.perf_counter(), self.step
        examples = 0
        progress = _Progress(self.total_steps, enabled=self.dist.is_main, log=self.log)
        progress.update(self.step)
        with self._signals(), progress, self._reporting():
            while self.step < self.total_steps:
                self._epoch_ended = False
                loss_total, rows = self.optimizer_step(self._next_batch() for _ in range(self.opt.grad_accum))
                examples += rows
                self.step += 1

                elapsed = time.perf_counter() - start_time
                done = self.step - start_step
                if self.step % self.opt.log_every == 0 or self.step == self.total_steps:
                    eta = elapsed / done * (self.total_steps - self.step)
                    self._record({"step": self.step, "epoch": self.epoch, "loss": loss_total,
                                  "lr": self.scheduler.get_last_lr()[0], "grad_norm": self._grad_norm(),
                                  "examples_per_second": examples / elapsed, **peak_memory(self.device),
                                  "elapsed": elapsed, "eta": eta})
                    progress.update(self.step, f"loss {loss_total:.4f}  lr {self.scheduler.get_last_lr()[0]:.2e}  "
                                               f"{examples / elapsed:.1f} ex/s  eta {eta:.0f}s")
                    note = self.method.training_note(self.raw_model, self.step)
                    if note and self.dist.is_main:
                        self.log(f"warning: {note}")
                else:
                    progress.update(self.step)

                finished = self.step == self.total_steps
                epoch_done = self._epoch_ended
                due_eval = finished or (self.step % eval_every == 0 if eval_every else epoch_done)
                due_save = finished or (self.step % save_every == 0 if save_every else epoch_done)
                if due_eval:
                    self._evaluate()
                if due_save or self._stop_signal is not None:
                    self.save_checkpoint()
                if self._stop_signal is not None:
                    raise Interrupted(f"stopped by signal {self._stop_signal} at step {self.step}; "
                                      f"checkpoint {self.last_checkpoint} (continue with train.resume=auto)")
        seconds = time.perf_counter() - start_time
        if self.opt.select_best and self.best_step is not None and self.best_step != self.step:
            found = ckpt.read_best_or_latest(self.ckpt_dir, self.log)  # a damaged best gives way to the last good step
            if found is not None:
                source, tensors = found
                self._load_state(tensors, None)
                self.log(f"final model = best evaluation ({self.best_metric} {self.best_value:.4f} at step {self.best_step})"
                         if source.name == "best" else f"final model = {source}")
        return {"steps": self.step, "epochs": self.step * self.opt.grad_accum / self.batches_per_epoch,
                "train_seconds": seconds, "best_step": self.best_step, "best_value": self.best_value}

    def _nan_message(self, what: str) -> str:
        last = self.last_checkpoint or "none yet"
        return (f"training stopped at step {self.step + 1}: {what}. "
                f"The last good checkpoint is {last}. Lower train.lr, enable train.max_grad_norm, or use float32.")


def peak_memory(device) -> dict:
    """The process's peak memory so far: torch.cuda.max_memory_allocated on a GPU, the peak RSS on a CPU."""
    import torch

    if device.type == "cuda":
        return {"peak_cuda_allocated_bytes": int(torch.cuda.max_memory_allocated(device))}
    try:
        import resource
    except ImportError:  # no getrusage on this platform
        return {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_bytes": int(peak if sys.platform == "darwin" else peak * 1024)}  # bytes on macOS, KiB on Linux


def _read_config(path: Path) -> dict:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


class _Progress:
    """A rich progress bar on a terminal, plain log lines otherwise (CI, files)."""

    def __init__(self, total: int, enabled: bool, log: Callable[[str], None]):
        self.total, self.enabled, self.log = total, enabled, log
        self.rich = enabled and sys.stdout.isatty()
        self._bar = None

    def __enter__(self):
        if self.rich:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"))
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, info="")
        return self

    def update(self, step: int, info: str | None = None) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, **({"info": info} if info else {}))
        elif info:
            self.log(f"step {step}/{self.total}  {info}")

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False
