"""Gradient clipping is applied, not only measured: the optimizer steps on the clipped gradients.

AdamW's first step barely depends on the gradient's scale, so comparing weights after one step would not
tell clipped from unclipped gradients; the test reads the gradients at the moment the optimizer steps.
"""

import copy

import pytest
import torch

from peftkit.config.schema import TrainArgs
from peftkit.methods import create_method
from peftkit.train.trainer import Trainer


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(5, 64, (4, 12), generator=g), "attention_mask": torch.ones(4, 12, dtype=torch.long),
            "labels": torch.tensor([0, 1, 1, 0])}


def _reference_grads(model, method, batch) -> dict[str, torch.Tensor]:
    """The unclipped gradients of one batch, computed outside the trainer."""
    model = copy.deepcopy(model).train()
    torch.manual_seed(1)
    method.compute_loss(model, batch).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _grads_at_optimizer_step(max_grad_norm, grad_accum=1):
    """(gradients the optimizer stepped on, unclipped reference gradients, trainer)."""
    from helpers.tiny import tiny_bert

    method = create_method("full")
    model = method.prepare(tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    reference = _reference_grads(model, method, _batch())
    trainer = Trainer.stepper(model, method, TrainArgs(lr=1e-3, warmup_ratio=0.0, schedule="constant",
                                                       max_grad_norm=max_grad_norm, grad_accum=grad_accum))
    seen: dict[str, torch.Tensor] = {}
    step = trainer.optimizer.step

    def spy(*args, **kwargs):
        seen.update({n: p.grad.detach().clone() for n, p in trainer.raw_model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    torch.manual_seed(1)
    trainer.optimizer_step([_batch()] * grad_accum)
    return seen, reference, trainer


def _total_norm(grads: dict[str, torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()


def test_optimizer_steps_on_gradients_clipped_to_max_grad_norm():
    max_norm = 1e-3
    seen, reference, trainer = _grads_at_optimizer_step(max_norm)
    unclipped = _total_norm(reference)
    assert unclipped > 10 * max_norm  # the clipping has work to do
    assert seen.keys() == reference.keys()
    assert _total_norm(seen) == pytest.approx(max_norm, rel=1e-4)
    # every gradient scaled by the same factor max_norm / ||g|| (torch adds 1e-6 to the norm)
    factor = max_norm / (unclipped + 1e-6)
    for name, g in reference.items():
        torch.testing.assert_close(seen[name], g * factor, rtol=1e-4, atol=1e-10)
    assert trainer.grad_norm == pytest.approx(unclipped, rel=1e-4)  # the logged norm is the one before clipping


def test_without_max_grad_norm_the_gradients_are_untouched():
    seen, reference, trainer = _grads_at_optimizer_step(None)
    for name, g in reference.items():
        torch.testing.assert_close(seen[name], g, rtol=1e-5, atol=1e-8)
    assert trainer.grad_norm is None


def test_accumulated_gradients_are_the_mean_over_micro_batches():
    """Two identical micro-batches: their mean gradient is the one-batch gradient (no clipping to hide a factor 2)."""
    seen, reference, _ = _grads_at_optimizer_step(None, grad_accum=2)
    for name, g in reference.items():
        torch.testing.assert_close(seen[name], g, rtol=1e-4, atol=1e-9)


def test_accumulated_gradients_are_clipped_as_a_whole():
    max_norm = 1e-3
    seen, reference, _ = _grads_at_optimizer_step(max_norm, grad_accum=2)
    factor = max_norm / (_total_norm(reference) + 1e-6)
    for name, g in reference.items():
        torch.testing.assert_close(seen[name], g * factor, rtol=1e-4, atol=1e-10)


def test_each_step_steps_on_its_own_gradients_only():
    """The second step's gradients are those of its own batch on the updated model (none carried over)."""
    seen, _, trainer = _grads_at_optimizer_step(None)
    reference = _reference_grads(trainer.raw_model, trainer.method, _batch())  # on the weights after step 1
    seen.clear()
    trainer.optimizer_step([_batch()])
    for name, g in reference.items():
        torch.testing.assert_close(seen[name], g, rtol=1e-4, atol=1e-8)
