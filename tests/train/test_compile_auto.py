"""``train.compile: auto``: a long single-process run times eager steps, compiles, times compiled steps and keeps
the faster; short runs, torchrun and methods that cannot be compiled stay eager. Timings here come from a stated
clock, never from the machine."""

import copy

import pytest
import torch

from peftkit.config.schema import TrainArgs
from peftkit.methods import create_method
from peftkit.train import compile_auto
from peftkit.train.compile_auto import CompileTrial, trial_or_none
from peftkit.train.trainer import Trainer


class Scripted:
    """A step whose duration is read from a script: eager steps take ``eager`` s, compiled ones ``compiled`` s."""

    def __init__(self, eager, compiled, compiles=True, fails_in_step=False):
        self.now, self.is_compiled, self.eager, self.compiled = 0.0, False, eager, compiled
        self.compiles, self.fails_in_step = compiles, fails_in_step
        self.calls, self.compile_calls, self.reverted, self.lines = 0, 0, 0, []

    def step(self, batches):
        self.calls += 1
        if self.is_compiled and self.fails_in_step:
            self.is_compiled = False  # what the trainer does when compiling fails inside the step
        self.now += self.compiled if self.is_compiled else self.eager
        return self.calls

    def compile_model(self):
        self.compile_calls += 1
        self.is_compiled = self.compiles
        return self.compiles

    def run_eager(self):
        self.reverted += 1
        self.is_compiled = False

    def trial(self, **kwargs):
        return CompileTrial(self.step, self.compile_model, self.run_eager, lambda: self.is_compiled, self.lines.append,
                            clock=lambda: self.now, **kwargs)


def run_until_decided(script, trial, limit=50):
    for step in range(limit):
        assert trial.step(None) == script.calls
        if trial.decided:
            return step + 1
    raise AssertionError("never decided")


def test_a_compiled_step_that_is_faster_is_kept():
    script = Scripted(eager=1.0, compiled=0.5)
    steps = run_until_decided(script, script.trial(timed=3))
    # 1 warm-up + 3 timed eager steps, the compiling step, 3 timed compiled steps
    assert steps == 8 and script.compile_calls == 1 and script.reverted == 0 and script.is_compiled
    assert script.lines == ["train.compile auto: compiled (compiled step 0.5 s, eager 1 s, median of 3 each)"]


def test_a_compiled_step_that_is_not_faster_enough_goes_back_to_eager():
    script = Scripted(eager=1.0, compiled=0.95)
    run_until_decided(script, script.trial(timed=2, min_gain=1.1))
    assert script.reverted == 1 and not script.is_compiled
    assert script.lines == ["train.compile auto: running eager: compiling did not pay (compiled step 0.95 s, "
                            "eager 1 s, median of 2 each; needs 1.1x)"]


def test_a_refused_or_failed_compilation_stays_eager_without_timing_more():
    refused = Scripted(eager=1.0, compiled=0.1, compiles=False)
    assert run_until_decided(refused, refused.trial(timed=2)) == 4  # decided at the step that would compile
    failed = Scripted(eager=1.0, compiled=0.1, fails_in_step=True)
    assert run_until_decided(failed, failed.trial(timed=2)) == 4
    for script in (refused, failed):
        assert script.compile_calls == 1 and script.reverted == 0 and script.lines == []


def test_only_auto_on_a_long_single_process_run_gets_a_trial():
    lines = []
    kwargs = dict(step=None, compile_model=None, run_eager=None, compiled=None)
    assert trial_or_none(False, 10_000, False, lines.append, **kwargs) is None
    assert trial_or_none(True, 10_000, False, lines.append, **kwargs) is None
    assert trial_or_none("auto", compile_auto.AUTO_MIN_STEPS - 1, False, lines.append, **kwargs) is None
    assert lines == []  # short runs stay eager silently
    assert trial_or_none("auto", 10_000, True, lines.append, **kwargs) is None
    assert lines == ["train.compile auto: running eager: under torchrun only train.compile=true compiles"]
    assert isinstance(trial_or_none("auto", compile_auto.AUTO_MIN_STEPS, False, lines.append, **kwargs), CompileTrial)


def test_compile_accepts_auto_and_refuses_other_words():
    from pydantic import ValidationError

    assert TrainArgs(compile="auto").compile == "auto" and TrainArgs(compile=True).compile is True
    with pytest.raises(ValidationError):
        TrainArgs(compile="yes")


def _trainer(compile_setting, max_steps, lines):
    from helpers.tiny import tiny_bert

    method = create_method("lora")
    torch.manual_seed(1)
    return Trainer(method.prepare(copy.deepcopy(tiny_bert())), method,
                   TrainArgs(lr=1e-3, warmup_ratio=0.0, schedule="constant", max_steps=max_steps,
                             compile=compile_setting), ".", [{}], lambda rows: rows[0], log=lines.append)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 64, (4, 12), generator=g), "attention_mask": torch.ones(4, 12, dtype=torch.long),
            "labels": torch.tensor([0, 1, 1, 0])}


def test_the_trainer_runs_the_trial_on_its_own_steps_and_trains_as_eager(monkeypatch):
    """The trainer's wiring, with a stand-in compilation (the plain forward set as the compiled one, so no
    inductor run): a long auto run calls it once at the step the trial names and then decides with one line;
    the losses are eager's."""
    monkeypatch.setattr(compile_auto, "AUTO_MIN_STEPS", 10)
    compiled_at = []

    def stand_in_compile(self):
        compiled_at.append(self_steps[0])
        self.raw_model._compiled_call_impl = self.raw_model._call_impl
        return True

    monkeypatch.setattr(Trainer, "_compile_model", stand_in_compile)
    eager_lines, auto_lines = [], []
    losses = {"eager": [], "auto": []}
    self_steps = [0]
    for name, setting, lines in (("eager", False, eager_lines), ("auto", "auto", auto_lines)):
        trainer = _trainer(setting, 10, lines)  # one after the other: each draws its dropout masks from seed 1
        for step in range(10):
            self_steps[0] = step
            losses[name].append(trainer.optimizer_step([_batch(step)])[0])
    assert compiled_at == [1 + compile_auto.AUTO_TIMED_STEPS]  # after the warm-up and the timed eager steps
    assert len(auto_lines) == 1 and auto_lines[0].startswith("train.compile auto: ")
    assert losses["auto"] == pytest.approx(losses["eager"], rel=1e-6)
    assert eager_lines == []


def test_a_short_auto_run_never_compiles(monkeypatch):
    def must_not_compile(self):
        raise AssertionError("compiled a short run")

    monkeypatch.setattr(Trainer, "_compile_model", must_not_compile)
    lines = []
    trainer = _trainer("auto", compile_auto.AUTO_MIN_STEPS - 1, lines)
    for step in range(6):
        trainer.optimizer_step([_batch(step)])
    assert lines == [] and trainer.raw_model._compiled_call_impl is None
