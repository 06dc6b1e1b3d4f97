"""train.report_to and the fields of metrics.jsonl: TensorBoard event files hold exactly the logged scalars, the
gradient norm is the global norm the clipping sees, the peak memory is the process's, and a tracker whose package
is missing is a recipe error."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftkit.commands.train import finetune
from peftkit.config.loader import load_recipe
from peftkit.errors import UserError
from peftkit.train.loggers import scalars

ROOT = Path(__file__).resolve().parents[2]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_the_logged_scalars(tiny_run_setup):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_run_setup("lora", max_steps=6, log_every=1, eval_every=3)
    recipe["train"]["report_to"] = ["tensorboard"]
    run = finetune(recipe, [])
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()

    rows = _rows(run)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval" in r]
    assert len(train_rows) == 6 and len(eval_rows) == 2
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in rows:  # an independent reading of metrics.jsonl: every number but step, elapsed and eta
        fields = row["eval"] if "eval" in row else {k: v for k, v in row.items() if k not in ("step", "elapsed", "eta")}
        prefix = "eval" if "eval" in row else "train"
        for key, value in fields.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(f"{prefix}/{key}", []).append((row["step"], float(value)))
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/examples_per_second", "train/peak_rss_bytes",
                 "eval/accuracy"):
        assert name in expected, name
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for name, points in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in logged] == [s for s, _ in points], name
        for (_, got), (_, want) in zip(logged, points):
            assert got == pytest.approx(want, rel=1e-6), name  # event files store float32


def test_a_run_without_report_to_writes_no_tracker_files(tiny_run_setup):
    run = finetune(tiny_run_setup("lora", max_steps=2), [])
    assert not (run / "tensorboard").exists()
    assert {"grad_norm", "peak_rss_bytes"} <= set(_rows(run)[0])


def _stepper(max_grad_norm):
    from helpers.tiny import tiny_bert

    from peftkit.config import TrainArgs
    from peftkit.methods import create_method
    from peftkit.train.trainer import Trainer

    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    reference = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # the same seed, same weights
    options = TrainArgs(max_steps=1, lr=1e-3, max_grad_norm=max_grad_norm)
    trainer = Trainer.stepper(model, create_method("full"), options)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(5, 60, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1])}
    reference(**batch).loss.backward()
    want = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in reference.parameters() if p.grad is not None))
    trainer.optimizer_step([batch])
    return trainer, want


@pytest.mark.parametrize("max_grad_norm", [1e-3, None], ids=["clipped", "unclipped"])
def test_grad_norm_is_the_global_norm_before_clipping(max_grad_norm):
    trainer, want = _stepper(max_grad_norm)
    assert want > 1e-2  # clipping to 1e-3 really scales these gradients down
    assert trainer._grad_norm() == pytest.approx(want, rel=1e-5)


def test_peak_rss_is_the_process_peak():
    from peftkit.train.trainer import peak_memory

    got = peak_memory(torch.device("cpu"))["peak_rss_bytes"]
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("no /proc on this platform")
    hwm = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
    assert 0.9 * hwm <= got <= hwm * 1.1 + (1 << 20)


def test_scalars_name_train_and_eval_fields():
    assert scalars({"step": 3, "epoch": 0, "loss": 0.5, "lr": 1e-3, "grad_norm": None, "elapsed": 2.0, "eta": 1.0}) == \
        {"train/epoch": 0.0, "train/loss": 0.5, "train/lr": 1e-3}
    assert scalars({"step": 3, "epoch": 0, "eval": {"accuracy": 0.75, "task": "sst2", "ok": True}}) == \
        {"eval/accuracy": 0.75}


def test_a_tracker_whose_package_is_missing_is_a_recipe_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(UserError, match=r"train\.report_to: tensorboard needs the package tensorboard.*"
                                        r"pip install 'peftkit\[tensorboard\]'"):
        load_recipe("lora-minilm-sst2", ["train.report_to=[tensorboard]"])


@pytest.mark.subprocess
def test_report_to_an_uninstalled_tracker_exits_2_before_any_work(tmp_path):
    import importlib.util

    missing = [name for name in ("wandb", "mlflow", "tensorboard") if importlib.util.find_spec(name) is None]
    if not missing:
        pytest.skip("every tracker is installed here")
    out = subprocess.run([sys.executable, "-m", "peftkit", "finetune", "lora-minilm-sst2",
                          f"train.report_to=[{missing[0]}]", f"output.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"pip install 'peftkit[{missing[0]}]'" in out.stderr
    assert not (tmp_path / "run").exists()


def test_report_to_refuses_unknown_and_repeated_trackers():
    with pytest.raises(UserError, match=r"train\.report_to\.0: must be one of .*did you mean \"tensorboard\""):
        load_recipe("lora-minilm-sst2", ["train.report_to=[tensorbord]"])
    with pytest.raises(UserError, match=r"train\.report_to: names a tracker twice"):
        load_recipe("lora-minilm-sst2", ["train.report_to=[tensorboard, tensorboard]"])
    assert load_recipe("lora-minilm-sst2", ["train.report_to=tensorboard"]).train.report_to == ["tensorboard"]
