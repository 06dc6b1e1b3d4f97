"""``train.compile: auto``: compile the model only where its compiled steps are measured faster than its eager ones.

Compiling costs tens of seconds on a CPU (again for each new sequence length) and helps some steps a lot (small
adapters over many small ops: LoRA) and others not at all (full fine-tuning of a small encoder, whose time is its
matmuls and dropout masks either way). So the run decides on itself:

1. a run with fewer than ``min_steps`` steps left, a method that cannot be compiled or a run under torchrun stays
   eager (the last two with one log line);
2. otherwise the first step runs eagerly as a warm-up, the next ``timed`` steps eagerly with the wall clock on;
3. then the model is compiled (that step, which compiles, is not timed) and the next ``timed`` compiled steps are
   timed;
4. the compiled model is kept where the median compiled step is at least ``min_gain`` times faster than the median
   eager one; else the run goes back to eager for good. Either way one log line gives both figures.

Compiled or eager, a step computes the same arithmetic with the same random masks (see Trainer._compile_model), so
the decision changes only the speed, never the result.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

AUTO_MIN_STEPS = 300  # compiling costs ~20-60 s on a CPU: only a run this long can win it back
AUTO_TIMED_STEPS = 3
AUTO_MIN_GAIN = 1.1  # the compiled step must be this much faster, measured, to be kept


class CompileTrial:
    """Runs the optimizer steps of ``train.compile: auto`` until it has decided, then gets out of the way: ``step``
    returns the step's result; ``decided`` turns True once the run is compiled or eager for good."""

    def __init__(self, step: Callable, compile_model: Callable[[], bool], run_eager: Callable[[], None],
                 compiled: Callable[[], bool], log: Callable[[str], None], timed: int = AUTO_TIMED_STEPS,
                 min_gain: float = AUTO_MIN_GAIN, clock: Callable[[], float] = time.perf_counter):
        self._step, self._compile_model, self._run_eager, self.log = step, compile_model, run_eager, log
        self._compiled = compiled
        self.timed, self.min_gain, self.clock = timed, min_gain, clock
        self.taken = 0
        self.eager: list[float] = []
        self.compiled: list[float] = []
        self.decided = False

    def step(self, batches):
        warmup_eager, compile_at = 1, 1 + self.timed
        if self.taken == compile_at and not self._compile_model():
            self.decided = True  # the method or torch refused; _compile_model logged why
        start = self.clock()
        result = self._step(batches)
        seconds = self.clock() - start
        if warmup_eager <= self.taken < compile_at:
            self.eager.append(seconds)
        elif self.taken > compile_at and not self.decided:
            self.compiled.append(seconds)
        if self.taken == compile_at and not self._compiled():
            self.decided = True  # compiling failed in the step: it ran eagerly and the run stays so (logged)
        self.taken += 1
        if len(self.compiled) == self.timed:
            self._decide()
        return result

    def _decide(self) -> None:
        eager, compiled = statistics.median(self.eager), statistics.median(self.compiled)
        figures = f"compiled step {compiled:.3g} s, eager {eager:.3g} s, median of {self.timed} each"
        if eager >= self.min_gain * compiled:
            self.log(f"train.compile auto: compiled ({figures})")
        else:
            self._run_eager()
            self.log(f"train.compile auto: running eager: compiling did not pay ({figures}; "
                     f"needs {self.min_gain}x)")
        self.decided = True


def trial_or_none(compile_setting, steps_left: int, distributed: bool, log: Callable[[str], None], **trial) \
        -> CompileTrial | None:
    """A CompileTrial where ``train.compile`` is 'auto' and the run is one process with at least AUTO_MIN_STEPS
    steps left; None otherwise (one log line where auto was asked for but stays eager)."""
    if compile_setting != "auto":
        return None
    if distributed:
        log("train.compile auto: running eager: under torchrun only train.compile=true compiles")
        return None
    if steps_left < AUTO_MIN_STEPS:
        return None  # silent: short runs (tests, quick recipes) are the common case and never pay for compiling
    return CompileTrial(log=log, **trial)
