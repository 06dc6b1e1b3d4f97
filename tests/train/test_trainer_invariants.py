"""What the trainer does each step, checked directly: the learning rate of every step follows warmup then decay,
and the best checkpoint follows the task's metric direction."""

import pytest
import torch

from peftkit.config.schema import TrainArgs
from peftkit.methods import create_method
from peftkit.train.trainer import Trainer


def _stepper(**options):
    from helpers.tiny import tiny_bert

    method = create_method("head-only")
    return Trainer.stepper(method.prepare(tiny_bert()), method, TrainArgs(**options))


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(5, 64, (2, 8), generator=g), "attention_mask": torch.ones(2, 8, dtype=torch.long),
            "labels": torch.tensor([0, 1])}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_each_step_uses_the_warmed_up_then_decayed_learning_rate(schedule):
    """10 steps, warmup_ratio 0.3 = 3 warmup steps: lr at step s is peak * (s + 1) / 3 for s < 3, then decays."""
    import math

    peak, total, warmup = 1e-2, 10, 3
    trainer = _stepper(lr=peak, max_steps=total, warmup_ratio=0.3, schedule=schedule)
    used = []
    step = trainer.optimizer.step

    def spy(*args, **kwargs):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    for _ in range(total):
        trainer.optimizer_step([_batch()])
    expected = []
    for s in range(total):
        if s < warmup:
            expected.append(peak * (s + 1) / warmup)
        else:
            progress = (s - warmup) / (total - warmup)
            expected.append(peak * (0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress))
    assert used == pytest.approx(expected, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("greater_is_better,best", [(True, 2), (False, 3)])
def test_best_step_follows_the_metric_direction(tmp_path, greater_is_better, best):
    from helpers.tiny import tiny_bert

    values = iter([0.5, 0.9, 0.2])  # steps 1, 2, 3
    method = create_method("head-only")
    trainer = Trainer(method.prepare(tiny_bert()), method, TrainArgs(max_steps=3, eval_every=1), tmp_path,
                      [{}], lambda rows: rows[0], eval_fn=lambda model: {"score": next(values)}, best_metric="score",
                      greater_is_better=greater_is_better, log=lambda msg: None)
    for step in (1, 2, 3):
        trainer.step = step
        trainer._evaluate()
    assert trainer.best_step == best
    assert trainer.best_value == {2: 0.9, 3: 0.2}[best]
