"""The shared loop: learning happens, resume is bit-identical, the NaN guard stops with the step."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.commands.train import finetune
from peftkit.errors import RunFailed
from peftkit.train.trainer import Trainer


def _final_state(run: Path) -> dict:
    files = list((run / "final").glob("*.safetensors"))
    assert files, f"no weights in {run}/final"
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def _write(tmp_path, recipe: dict, name: str) -> str:
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_full_finetuning_learns_and_writes_metrics(tiny_run_setup, tmp_path):
    recipe = tiny_run_setup("full", max_steps=60, lr=5e-3, eval_every=20, save_every=20)
    run = finetune(_write(tmp_path, recipe, "full"), [])
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("accuracy", "trainable_params", "total_params", "train_seconds", "steps", "baseline"):
        assert key in metrics
    assert metrics["steps"] == 60 and metrics["trainable_params"] == metrics["total_params"]
    losses = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert metrics["accuracy"] > 0.75  # the tiny task is separable by one word
    assert (run / "config.yaml").is_file() and (run / "env.json").is_file() and (run / "train.log").is_file()


@pytest.mark.parametrize("method", ["lora", "full", "bitfit"])
def test_resume_after_crash_is_bit_identical(tiny_run_setup, tmp_path, monkeypatch, method):
    # select_best off: the final weights are the last step's, which only a faithful resume reproduces (with it on,
    # both runs could end on a best checkpoint written before the crash)
    straight = finetune(_write(tmp_path, tiny_run_setup(method, out="straight", select_best=False), "a"), [])

    saves = {"n": 0}
    original = Trainer.save_checkpoint

    def crash_after_second_checkpoint(self):
        out = original(self)
        saves["n"] += 1
        if saves["n"] == 2:
            raise RuntimeError("simulated crash")
        return out

    monkeypatch.setattr(Trainer, "save_checkpoint", crash_after_second_checkpoint)
    path = _write(tmp_path, tiny_run_setup(method, out="resumed", select_best=False), "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(path, [])
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    assert not (tmp_path / "resumed" / "final").exists()
    resumed = finetune(path, ["train.resume=auto"])
    log = (resumed / "train.log").read_text()
    assert "resumed from" in log and "step-000004" in log

    a, b = _final_state(straight), _final_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (straight, resumed))
    assert ma["accuracy"] == mb["accuracy"]


def test_nan_guard_names_the_step_and_keeps_last_checkpoint(tiny_run_setup, tmp_path, monkeypatch):
    from peftkit.methods.lora import LoRA

    calls = {"n": 0}
    original = LoRA.compute_loss

    def nan_on_fifth_batch(self, model, batch):
        calls["n"] += 1
        loss = original(self, model, batch)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(LoRA, "compute_loss", nan_on_fifth_batch)
    with pytest.raises(RunFailed) as e:
        finetune(_write(tmp_path, tiny_run_setup("lora", out="nan"), "nan"), [])
    assert "step 5" in str(e.value) and "step-000004" in str(e.value)
    assert (tmp_path / "nan" / "checkpoints" / "step-000004" / "manifest.json").is_file()


def test_existing_run_dir_is_refused_unless_resume_or_overwrite(tiny_run_setup, tmp_path):
    from peftkit.errors import UserError

    path = _write(tmp_path, tiny_run_setup("bitfit", out="same", max_steps=2), "s")
    finetune(path, [])
    with pytest.raises(UserError, match="already holds"):
        finetune(path, [])
    with pytest.raises(UserError, match="different recipe"):
        finetune(path, ["train.resume=auto", "train.lr=0.5"])
    finetune(path, ["output.overwrite=true"])


def test_grad_accum_equals_the_larger_batch(tiny_run_setup, tmp_path):
    """Two micro-batches of 4 accumulated = one batch of 8 (same examples per step; dropout off)."""
    from helpers.tiny import save_tiny_classifier

    no_dropout = save_tiny_classifier(tmp_path / "nodrop", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    runs = []
    for out, extra in (("b8", {"batch_size": 8}), ("b4x2", {"batch_size": 4, "grad_accum": 2})):
        recipe = tiny_run_setup("full", out=out, max_steps=2, group_by_length=False, max_grad_norm=None, **extra)
        recipe["model"]["name"] = str(no_dropout)
        runs.append(_final_state(finetune(_write(tmp_path, recipe, out), [])))
    sa, sb = runs
    assert all((sa[k] - sb[k]).abs().max().item() < 1e-5 for k in sa)  # a nan anywhere fails
    assert any(not torch.equal(sa[k], load_file(str(no_dropout / "model.safetensors")).get(k, sa[k])) for k in sa)
