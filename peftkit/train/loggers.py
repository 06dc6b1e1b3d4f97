"""``train.report_to``: the rows the trainer writes to metrics.jsonl, sent to TensorBoard, Weights & Biases or MLflow.

Each backend is imported only when a recipe names it (the recipe loader has already checked that its package is
installed), and each can work without a network: TensorBoard writes event files into ``<run>/tensorboard``, wandb
honours ``WANDB_MODE=offline`` (files under ``<run>/wandb``), MLflow writes a file store in ``<run>/mlruns`` unless
``MLFLOW_TRACKING_URI`` names a server. Only the main process reports.

A metrics.jsonl row becomes scalars named ``train/<field>`` (loss, lr, grad_norm, examples_per_second, the peak
memory, epoch) or ``eval/<metric>`` (an evaluation), at the row's optimizer step.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from peftkit.errors import RunFailed

SKIPPED = ("step", "elapsed", "eta")  # the step is the x axis; the trackers keep wall time themselves


def scalars(row: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl row, named as the trackers show them."""
    if isinstance(row.get("eval"), dict):
        return {f"eval/{k}": float(v) for k, v in row["eval"].items() if _number(v)}
    return {f"train/{k}": float(v) for k, v in row.items() if k not in SKIPPED and _number(v)}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("recipe", "```yaml\n" + _yaml(config) + "\n```")

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "peftkit"), name=run_dir.name,
                              dir=str(run_dir), config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path, config: dict):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "peftkit")
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
        for key, value in _flat(config).items():
            self.client.log_param(self.run_id, key, str(value)[:500])

    def log(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
# The folder each backend writes inside the run directory (declared to the run's marker before the run writes
# them, so that output.overwrite removes them and a symbolic link there is refused).
RUN_DIR_ENTRIES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlruns"}


def run_dir_entries(names: list[str]) -> tuple[str, ...]:
    """The top-level entries of the run directory that the trackers ``names`` write."""
    return tuple(RUN_DIR_ENTRIES[n] for n in names if n in RUN_DIR_ENTRIES
                 and not (n == "mlflow" and os.environ.get("MLFLOW_TRACKING_URI")))


class Reporters:
    """The trackers of one run; ``record(row)`` is called with every row written to metrics.jsonl."""

    def __init__(self, backends: list):
        self.backends = backends

    def record(self, row: dict) -> None:
        values = scalars(row)
        if values:
            for backend in self.backends:
                backend.log(values, int(row.get("step", 0)))


@contextlib.contextmanager
def reporting(names: list[str], run_dir: Path, config: dict | None = None) -> Iterator[Reporters | None]:
    """Open the named trackers for ``run_dir`` (None when there are none) and close them whatever happens."""
    if not names:
        yield None
        return
    opened = []
    try:
        for name in names:
            try:
                opened.append(BACKENDS[name](Path(run_dir), config or {}))
            except ImportError as e:
                raise RunFailed(f"train.report_to names {name}, but it cannot be imported: {e}. Reinstall it "
                                f"(pip install 'peftkit[{name}]') or leave it out of train.report_to.") from e
        yield Reporters(opened)
    finally:
        for backend in reversed(opened):
            with contextlib.suppress(Exception):  # a tracker failing to close must not hide the run's own result
                backend.close()


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
