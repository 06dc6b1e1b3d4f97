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


def _rows(n=16):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(5, 64, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(n)]


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _full_trainer(run_dir):
    """Full fine-tuning of a tiny BERT with dropout on (so the restored RNG matters), a checkpoint every 2 steps."""
    from helpers.tiny import tiny_bert

    torch.manual_seed(0)
    method = create_method("full")
    options = TrainArgs(max_steps=4, batch_size=4, save_every=2, lr=1e-3, warmup_ratio=0.0, seed=3,
                        group_by_length=False)
    return Trainer(method.prepare(tiny_bert()), method, options, run_dir, _rows(), _collate, log=lambda msg: None)


def test_resumed_run_continues_with_the_optimizer_moments_and_rng_of_the_checkpoint(tmp_path, monkeypatch):
    """Stopped after the step-2 checkpoint and resumed: the weights after step 4 equal the uninterrupted run's bit for
    bit (AdamW's moments, the schedule, the data order and the dropout RNG all continue)."""
    straight = _full_trainer(tmp_path / "straight")
    straight.train()

    original = Trainer.save_checkpoint

    def crash_after_saving(self):
        original(self)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(Trainer, "save_checkpoint", crash_after_saving)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _full_trainer(tmp_path / "resumed").train()
    monkeypatch.setattr(Trainer, "save_checkpoint", original)

    resumed = _full_trainer(tmp_path / "resumed")
    torch.manual_seed(123)  # whatever the RNG is now, the checkpoint's state must replace it
    resumed.resume("auto")
    assert resumed.step == 2
    resumed.train()
    assert resumed.step == straight.step == 4
    for (name, a), b in zip(straight.raw_model.named_parameters(), resumed.raw_model.parameters()):
        assert torch.equal(a, b), name
