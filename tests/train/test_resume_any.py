"""``train.resume_any=true``: the resumed run trains at the settings config.yaml records, and a checkpoint of
another method or shape is refused (exit 2) before anything in the run directory is rewritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers.reliability import invoke, make_setup, recipe, tree_snapshot, write_recipe

from peftkit.train.schedule import lr_factor


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("resume-any"))


def _lr_rows(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["lr"] for r in rows if "lr" in r}


def test_resume_any_trains_at_the_new_learning_rate_and_schedule_it_records(setup, tmp_path):
    """Stopped at step 3 with lr 1e-3 (linear); resumed with lr 4e-4, a cosine schedule and 6 steps: the steps
    after the resume run at what the new settings give at each step, as config.yaml records."""
    first = recipe(setup, "lr-change", method="lora", max_steps=3, save_every=3, eval_every=None, lr=1e-3,
                   schedule="linear", warmup_ratio=0.0)
    result = invoke("finetune", write_recipe(tmp_path / "a.yaml", first))
    assert result.exit_code == 0, result.output
    run = Path(setup["root"]) / "lr-change"
    second = recipe(setup, "lr-change", method="lora", max_steps=6, save_every=3, eval_every=None, lr=4e-4,
                    schedule="cosine", warmup_ratio=0.0, resume="auto", resume_any=True)
    result = invoke("finetune", write_recipe(tmp_path / "b.yaml", second))
    assert result.exit_code == 0, result.output
    assert "written with other settings" in result.output and "resumed from" in result.output
    recorded = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert recorded["lr"] == 4e-4 and recorded["schedule"] == "cosine"
    lrs = _lr_rows(run)
    assert lrs[3] == pytest.approx(1e-3 * lr_factor(3, 3, 0, "linear"), abs=1e-12)  # the first run's own step
    for step in (4, 5, 6):  # the row of step k holds the rate after k scheduler steps
        assert lrs[step] == pytest.approx(4e-4 * lr_factor(step, 6, 0, "cosine"), rel=1e-9), (step, lrs)


def test_resume_any_applies_the_new_settings_to_the_optimizer(tmp_path):
    """In-process: after resume_from with other settings, every group's lr, initial lr, betas and weight decay
    are this recipe's, and the scheduler's base rates too; the Adam moments are the checkpoint's."""
    import torch

    from peftkit.config.schema import TrainArgs
    from peftkit.methods import create_method
    from peftkit.train.trainer import Trainer

    def trainer(run_dir, **options):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        args = TrainArgs(max_steps=8, batch_size=2, warmup_ratio=0.25, save_every=2, **options)
        data = [{"x": torch.randn(4), "y": torch.randn(4)} for _ in range(8)]

        def collate(rows):
            return {"x": torch.stack([r["x"] for r in rows]), "labels": torch.stack([r["y"] for r in rows])}

        method = create_method("full")
        method.compute_loss = lambda model, batch: ((model(batch["x"]) - batch["labels"]) ** 2).mean()
        return Trainer(model, method, args, run_dir, data, collate, log=lambda msg: None,
                       settings_hash=json.dumps(options, sort_keys=True))

    old = trainer(tmp_path, lr=1e-2, weight_decay=0.0, adam_betas=[0.9, 0.999])
    old.total_steps = 4  # stop at step 4 of 8
    old.train()
    moments = old.optimizer.state_dict()["state"]
    new = trainer(tmp_path, lr=3e-3, weight_decay=0.1, adam_betas=[0.8, 0.99], schedule="constant")
    new.resume("auto", allow_foreign=True)
    assert new.step == 4
    assert new.scheduler.base_lrs == [3e-3] * len(new.optimizer.param_groups)
    for group in new.optimizer.param_groups:
        assert group["initial_lr"] == 3e-3 and group["lr"] == pytest.approx(3e-3)  # constant after the warmup
        assert tuple(group["betas"]) == (0.8, 0.99)
    assert {g["weight_decay"] for g in new.optimizer.param_groups} <= {0.1, 0.0}
    assert 0.1 in {g["weight_decay"] for g in new.optimizer.param_groups}
    for index, state in new.optimizer.state_dict()["state"].items():
        assert torch.equal(state["exp_avg"], moments[index]["exp_avg"])


@pytest.mark.parametrize("change, needle", [
    (["method.r=4"], "method.r: 8 in that run, 4 now"),
    (["method.name=bitfit"], "method.name: 'lora' in that run, 'bitfit' now"),
])
def test_resume_any_with_another_method_or_rank_is_exit_2_and_the_run_dir_untouched(setup, tmp_path, change, needle):
    r = recipe(setup, f"other-method-{change[0][7:].replace('=', '-')}", method="lora", max_steps=2, save_every=2,
               eval_every=None)  # LoRA's default rank, 8
    path = write_recipe(tmp_path / "r.yaml", r)
    assert invoke("finetune", path).exit_code == 0
    run = Path(r["output"]["dir"])
    before = tree_snapshot(run, mtimes=True)
    result = invoke("finetune", path, "train.resume=auto", "train.resume_any=true", "train.max_steps=4", *change)
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception), result.output  # a message, not a traceback
    assert "does not fit this recipe's model and method" in result.output and needle in result.output
    assert tree_snapshot(run, mtimes=True) == before  # config.yaml, the marker, train.log, env.json: nothing rewritten
