"""``train.compile``: the model's forward (and through autograd its backward) compiled in place by torch.compile,
the same losses as eager; a method that declares it cannot be compiled, or a compilation that fails, runs eagerly
with one log line."""

import copy

import pytest
import torch

from peftkit.config.schema import TrainArgs
from peftkit.methods import create_method
from peftkit.train.trainer import Trainer


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 64, (4, 12), generator=g), "attention_mask": torch.ones(4, 12, dtype=torch.long),
            "labels": torch.tensor([0, 1, 1, 0])}


def _losses(method, base, steps=3, **options):
    """(losses of ``steps`` optimizer steps from seed 1, the trainer, its log lines)."""
    lines = []
    torch.manual_seed(1)
    trainer = Trainer(method.prepare(copy.deepcopy(base)), method,
                      TrainArgs(lr=1e-3, warmup_ratio=0.0, schedule="constant", **options), ".", [{}],
                      lambda rows: rows[0], log=lines.append)
    return [trainer.optimizer_step(_batch(i) for _ in range(1)) for i in range(steps)], trainer, lines


def test_compiled_lora_trains_as_eager():
    """Compiled for the CPU by inductor's C++ backend (~15-30 s on two cores): losses equal eager's to 1e-5
    relative (fused kernels may reorder float sums; dropout draws as eager, so the masks are the same)."""
    from helpers.tiny import tiny_bert

    method, base = create_method("lora"), tiny_bert()
    eager, _, _ = _losses(method, base)
    compiled, trainer, lines = _losses(method, base, compile=True)
    assert trainer.raw_model._compiled_call_impl is not None  # really compiled, not a silent fallback
    assert not any("train.compile" in line for line in lines)
    assert [loss for loss, _ in compiled] == pytest.approx([loss for loss, _ in eager], rel=1e-5)
    assert compiled[0][0] != compiled[-1][0]  # it trained


def test_a_method_that_cannot_be_compiled_runs_eagerly_with_one_line():
    from helpers.tiny import tiny_bert

    method, base = create_method("meft1"), tiny_bert()
    assert method.compile_refusal
    eager, _, _ = _losses(method, base, steps=2)
    losses, trainer, lines = _losses(method, base, steps=2, compile=True)
    assert trainer.raw_model._compiled_call_impl is None
    assert lines == [f"train.compile: running eager: method 'meft1' cannot be compiled ({method.compile_refusal})"]
    assert losses == eager


def test_a_compilation_that_fails_continues_eagerly_from_the_same_step(monkeypatch):
    from helpers.tiny import tiny_bert

    def compile_that_fails(fn, *args, **kwargs):
        def first_call(*a, **k):
            torch.rand(8)  # a random draw before failing, as a compiled dropout would
            raise torch._dynamo.exc.InternalTorchDynamoError("no working C++ compiler\ndetails")

        return first_call

    method, base = create_method("lora"), tiny_bert()
    eager, _, _ = _losses(method, base)
    monkeypatch.setattr(torch, "compile", compile_that_fails)
    losses, trainer, lines = _losses(method, base, compile=True)
    assert lines == ["train.compile: running eager: compiling the model failed "
                     "(InternalTorchDynamoError: no working C++ compiler)"]
    assert trainer.raw_model._compiled_call_impl is None
    assert losses == eager  # the failed attempt left no gradient, update or random draw behind


def test_an_error_of_the_model_itself_is_not_taken_for_a_compilation_failure(monkeypatch):
    from helpers.tiny import tiny_bert

    def compile_to_a_failing_forward(fn, *args, **kwargs):
        def forward(*a, **k):
            raise ValueError("a shape the model refuses")

        return forward

    monkeypatch.setattr(torch, "compile", compile_to_a_failing_forward)
    with pytest.raises(ValueError, match="a shape the model refuses"):
        _losses(create_method("lora"), tiny_bert(), steps=1, compile=True)
