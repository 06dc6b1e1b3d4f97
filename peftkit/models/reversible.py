"""Reversible two-stream stacks whose backward pass recomputes activations instead of caching them.

One reversible block maps two streams (x1, x2) to (y1, y2):

    y1 = lam  * x1 + F(x2)
    y2 = beta * x2 + G(y1)

and can be inverted exactly (up to rounding):  x2 = (y2 - G(y1)) / beta,  x1 = (y1 - F(x2)) / lam.
Optionally the streams are swapped after the block, so the next block's F reads this block's y1.

``run_stack`` runs a list of blocks through :class:`ReversibleStackFunction`, a custom autograd
Function that computes the forward pass under ``no_grad`` and saves only the top outputs (plus the
tensor keyword arguments such as the attention mask). Its backward walks the blocks from the top:
it reconstructs each block's inputs from its outputs, recomputes F and G with grad enabled, and
backpropagates through them one block at a time. Activation memory is therefore that of a single
block, whatever the depth.

Activation memory of one block whatever the depth has a price in floating point: every reconstruction
divides the rounding error by lam·beta, so errors grow by 1/(lam·beta) per block from the top down.
``run_stack(segment_layers=k)`` runs the blocks as consecutive segments of k, each its own Function: the
streams at segment boundaries are saved (2 tensors per segment) and reconstruction never crosses a boundary.
``gradient_errors_by_block`` measures the per-block gradient error against ordinary autograd.

``run_stack(fixed_point=True)`` removes the rounding instead of bounding it. Inside the stack the streams are
fixed-point numbers (FRACTION_BITS bits after the point: integers below 2^52, held exactly in float64), where
addition is exact, and a scale lam = num/den is a multiplication by num and a floor division by den whose
remainder (log2(den) bits per element) is pushed on a :class:`RemainderStack`. The inverse pops it back, so every
block's inputs are reconstructed bit for bit, F and G are recomputed on exactly the inputs the forward gave them,
and the gradients are those of ordinary autograd through the same forward at any depth. The cost: the two top
streams are kept in 8 bytes per element instead of the model's float, plus one 8-byte word per element for every
~52/log2(den) scalings (15 at lam = 0.1): constant up to that depth.
The idea of storing the bits a non-invertible scaling drops is Maclaurin et al.'s exact reversible SGD
(arXiv 1502.03492); Gomez et al.'s RevNet (arXiv 1707.04585) notes the same floating-point drift.

Dropout replays exactly: the RNG state (CPU and, for CUDA tensors, the device's generator) is
captured before every F and G call of the forward pass and restored around the recomputation, inside
``torch.random.fork_rng`` so that the caller's RNG stream is left untouched by the backward pass.

Parameter gradients are returned through the Function (the trainable parameters are inputs of the
Function), so ``loss.backward()`` and ``torch.autograd.grad`` both work, and autograd always calls the
Function's backward when some parameter trains, even if the stack input (frozen embeddings) does not
require grad.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class ReversibleBlock:
    """F, G and the modules whose parameters they use; ``lam``/``beta`` scale the residual streams."""

    f: Callable[..., torch.Tensor]  # f(x2, **kwargs) -> tensor shaped like x2
    g: Callable[..., torch.Tensor]  # g(y1, **kwargs) -> tensor shaped like y1
    f_modules: list[nn.Module]
    g_modules: list[nn.Module]
    lam: float = 1.0
    beta: float = 1.0
    swap: bool = False

    def params(self, which: str) -> list[nn.Parameter]:
        """Trainable parameters used by F ('f') or G ('g'), each once."""
        modules = self.f_modules if which == "f" else self.g_modules
        seen, out = set(), []
        for module in modules:
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    # ---- plain computation (differentiable with ordinary autograd) --------------------------
    def forward(self, x1, x2, kwargs, rng: list | None = None, arithmetic: "FloatStreams | None" = None):
        """(x1, x2) -> streams for the next block; ``rng`` collects the RNG states when given. ``arithmetic`` says
        how the streams are held (floats, or fixed point inside a fixed-point reversible stack)."""
        arithmetic = arithmetic or FLOAT_STREAMS
        x2_in = arithmetic.to_input(x2)
        if rng is not None:
            rng.append(RngState.capture(x2_in.device))
        y1 = arithmetic.scaled_add(self.f(x2_in, **kwargs), x1, self.lam)
        y1_in = arithmetic.to_input(y1)
        if rng is not None:
            rng.append(RngState.capture(y1_in.device))
        y2 = arithmetic.scaled_add(self.g(y1_in, **kwargs), x2, self.beta)
        return (y2, y1) if self.swap else (y1, y2)

    def inverse(self, out1, out2, kwargs, arithmetic: "FloatStreams | None" = None):
        """Streams after the block -> (x1, x2) before it (no grad; dropout must be off or replayed)."""
        arithmetic = arithmetic or FLOAT_STREAMS
        y1, y2 = (out2, out1) if self.swap else (out1, out2)
        x2 = arithmetic.unscale(y2, self.g(arithmetic.to_input(y1), **kwargs), self.beta)
        x1 = arithmetic.unscale(y1, self.f(arithmetic.to_input(x2), **kwargs), self.lam)
        return x1, x2

    # ---- one step of the memory-free backward pass --------------------------------------------
    def backward_step(self, out1, out2, d_out1, d_out2, kwargs, rng_f, rng_g, grads: dict[int, torch.Tensor],
                      arithmetic: "FloatStreams | None" = None):
        """Reconstruct this block's inputs and their gradients; add parameter grads into ``grads``."""
        arithmetic = arithmetic or FLOAT_STREAMS
        y1, y2 = (out2, out1) if self.swap else (out1, out2)
        dy1, dy2 = (d_out2, d_out1) if self.swap else (d_out1, d_out2)

        g_params = self.params("g")
        with torch.enable_grad():
            y1_leaf = arithmetic.to_input(y1).detach().requires_grad_(True)
            with rng_g.replay():
                g_out = self.g(y1_leaf, **kwargs)
            g_grads = torch.autograd.grad(g_out, [y1_leaf, *g_params], dy2, allow_unused=True)
        with torch.no_grad():
            x2 = arithmetic.unscale(y2, g_out.detach(), self.beta)
            dy1_total = dy1 if g_grads[0] is None else torch.add(dy1, g_grads[0])
        del g_out, y1_leaf
        _accumulate(grads, g_params, g_grads[1:])

        f_params = self.params("f")
        with torch.enable_grad():
            x2_leaf = arithmetic.to_input(x2).detach().requires_grad_(True)
            with rng_f.replay():
                f_out = self.f(x2_leaf, **kwargs)
            f_grads = torch.autograd.grad(f_out, [x2_leaf, *f_params], dy1_total, allow_unused=True)
        with torch.no_grad():
            x1 = arithmetic.unscale(y1, f_out.detach(), self.lam)
            dx1 = dy1_total if self.lam == 1 else dy1_total * self.lam
            if f_grads[0] is None:
                dx2 = dy2 if self.beta == 1 else dy2 * self.beta
            else:
                dx2 = _scaled_add(f_grads[0], dy2, self.beta)
        del f_out, x2_leaf
        _accumulate(grads, f_params, f_grads[1:])
        return x1, x2, dx1, dx2


def _scaled_add(out: torch.Tensor, stream: torch.Tensor, factor: float) -> torch.Tensor:
    """out + factor·stream in one pass (the forward's y = factor·x + F(x'), and dx2 = beta·dy2 + dF)."""
    return out + stream if factor == 1 else torch.add(out, stream, alpha=factor)


def _unscale(y: torch.Tensor, out: torch.Tensor, factor: float) -> torch.Tensor:
    """(y - out) / factor, the inverse of ``_scaled_add``; the division works on the fresh difference in place."""
    diff = y - out
    return diff if factor == 1 else diff.div_(factor)


class FloatStreams:
    """Streams held as the model's floats: y = factor·x + out, inverted by (y - out) / factor (rounding included)."""

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def leave(self, stream: torch.Tensor) -> torch.Tensor:
        return stream

    def to_input(self, stream: torch.Tensor) -> torch.Tensor:
        return stream

    def scaled_add(self, out, stream, factor: float):
        return _scaled_add(out, stream, factor)

    def unscale(self, y, out, factor: float):
        return _unscale(y, out, factor)


FLOAT_STREAMS = FloatStreams()

FRACTION_BITS = 32  # resolution 2^-32 (2.3e-10): finer than fp32 rounding for any value above 1e-2
GRID = 2.0 ** FRACTION_BITS
EXACT = 2.0 ** 52  # every integer below 2^53 is a float64; one addition of two values below 2^52 stays exact
MAX_DENOMINATOR = 1000  # lam and beta must be fractions num/den with den <= 1000 (0.1 = 1/10, 0.05 = 1/20, ...)


@lru_cache(maxsize=64)
def exact_ratio(factor: float) -> tuple[int, int]:
    """(num, den) with factor = num/den and den <= MAX_DENOMINATOR, or ValueError when there is none."""
    ratio = Fraction(factor).limit_denominator(MAX_DENOMINATOR)
    if factor <= 0 or ratio.numerator > MAX_DENOMINATOR or abs(float(ratio) - factor) > 1e-12 * factor:
        raise ValueError(f"{factor!r} is not a fraction num/den with num and den <= {MAX_DENOMINATOR}, which fixed-point "
                         f"streams need to scale exactly (0.1, 0.05, 0.25 and 1.5 are)")
    return ratio.numerator, ratio.denominator


def _floor_div(value: torch.Tensor, den: int) -> torch.Tensor:
    """floor(value / den) for integers |value| < 2^52 held in float64, exactly: the division's rounding error is below
    |quotient|·2^-53 < 1/(2·den), less than the distance 1/den of a non-integral quotient to the next integer."""
    return torch.div(value, den).floor_()  # in place on the fresh quotient: one allocation, not two


# The stream arithmetic below works in place on tensors it has just made: at BERT-base sizes a fresh float64
# tensor costs more in page faults than the arithmetic on it, and this runs several times per layer.

class RemainderStack:
    """The remainders the fixed-point scalings drop, base-den digits packed into words (one element per stream
    element, integers below 2^52 held in float64), pushed by the forward and popped in reverse order by the inverse.
    Popping replaces words instead of modifying them, so a stack built over a copy of the saved list can be consumed
    while the saved words stay whole (a second backward finds them again)."""

    def __init__(self, words: list | None = None, capacities: list | None = None):
        self.words: list[torch.Tensor] = words or []
        self.capacities: list[int] = capacities or []  # product of the radices packed into each word

    def push(self, stream: torch.Tensor, quotient: torch.Tensor, radix: int) -> None:
        """Push the remainder stream - radix·quotient, a digit in [0, radix)."""
        if self.words and self.capacities[-1] * radix <= EXACT and self.words[-1].shape == stream.shape:
            # word·radix + remainder; the forward's own words are not saved yet, so in place is safe
            self.words[-1].mul_(radix).add_(stream).sub_(quotient, alpha=radix)
            self.capacities[-1] *= radix
        else:
            self.words.append(torch.add(stream, quotient, alpha=-radix))
            self.capacities.append(radix)

    def pop_into(self, target: torch.Tensor, radix: int) -> torch.Tensor:
        """``target`` + the last pushed digit (in place), the digit removed from the stack."""
        word, capacity = self.words[-1], self.capacities[-1]
        if capacity == radix:
            self.words.pop()
            self.capacities.pop()
            return target.add_(word)
        self.words[-1] = _floor_div(word, radix)
        self.capacities[-1] = capacity // radix
        return target.add_(word).sub_(self.words[-1], alpha=radix)


class FixedPointStreams:
    """Streams held in fixed point (value · 2^FRACTION_BITS, an integer below 2^52 held exactly in float64, whose
    elementwise arithmetic is fast where int64's is not) with the dropped remainders kept: exactly invertible.

    F and G still compute in ``dtype``: they read ``to_input(stream)``, and their outputs are rounded to the grid once.
    """

    def __init__(self, dtype: torch.dtype, stack: RemainderStack | None = None):
        self.dtype = dtype
        self.stack = stack if stack is not None else RemainderStack()

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return _checked(_on_grid(x).double())

    def leave(self, stream: torch.Tensor) -> torch.Tensor:
        return self.to_input(stream)

    def to_input(self, stream: torch.Tensor) -> torch.Tensor:
        # one rounding to float32, then an exact scaling (rounding commutes with powers of two); float16 would
        # overflow before the scaling, so it goes through float32
        work = torch.float32 if self.dtype == torch.float16 else self.dtype
        return stream.to(work, copy=True).mul_(1.0 / GRID).to(self.dtype)  # copy: float64 would alias the stream

    def scaled_add(self, out, stream, factor: float):
        num, den = exact_ratio(factor)
        if num != 1:
            stream = _checked(stream * num)
        if den != 1:
            quotient = _floor_div(stream, den)
            self.stack.push(stream, quotient, den)
            stream = quotient
        elif num == 1:
            stream = stream.clone()  # the caller's stream stays as it was
        return _checked(stream.add_(_on_grid(out)))  # float32 integers below 2^53 convert to float64 exactly

    def unscale(self, y, out, factor: float):
        num, den = exact_ratio(factor)
        stream = torch.sub(y, _on_grid(out))
        if den != 1:
            stream = self.stack.pop_into(stream.mul_(den), den)  # quotient·den + remainder
        if num != 1:
            stream = stream.div_(num)  # exact: the forward multiplied an integer by num
        return stream


def _on_grid(x: torch.Tensor) -> torch.Tensor:
    """x · 2^FRACTION_BITS rounded to integers, in float32 (float64 for float64 input). Scaling by a power of two is
    exact and an integer-valued float32 converts to float64 exactly; bfloat16 and float16 go through float32 (float16
    would overflow)."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return (work * GRID).round_()


def _checked(stream: torch.Tensor) -> torch.Tensor:
    """``stream``, after making sure every element is finite and inside the exact range (past 2^53 float64 rounds)."""
    if stream.numel():
        low, high = torch.aminmax(stream)
        if not (-EXACT < low.item() and high.item() < EXACT):  # also false for NaN
            raise FloatingPointError(
                f"a reversible layer's stream left the fixed-point range (|value| < {EXACT / GRID:,.0f} at resolution "
                f"2^-{FRACTION_BITS}), so its activations are not finite or are exploding (MEFT: method.stream_arithmetic "
                f"float holds the streams as floats)")
    return stream


def _accumulate(grads: dict[int, torch.Tensor], params, new_grads) -> None:
    for p, g in zip(params, new_grads):
        if g is None:
            continue
        grads[id(p)] = g if id(p) not in grads else grads[id(p)] + g


@dataclass
class RngState:
    """The CPU generator state and, on CUDA, the device generator state at one point of the forward."""

    cpu: torch.Tensor
    device: torch.device
    cuda: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> "RngState":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), device, cuda)

    def replay(self):
        """Context: run with this RNG state, then give the caller back its own RNG state."""
        return _Replay(self)


class _Replay:
    def __init__(self, state: RngState):
        self.state = state
        devices = [self.state.device] if self.state.cuda is not None else []
        self.fork = torch.random.fork_rng(devices=devices, device_type="cuda")

    def __enter__(self):
        self.fork.__enter__()
        torch.set_rng_state(self.state.cpu)
        if self.state.cuda is not None:
            torch.cuda.set_rng_state(self.state.cuda, self.state.device)

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)


class ReversibleStackFunction(torch.autograd.Function):
    """Runs blocks under no_grad; saves only the top outputs; recomputes block by block in backward."""

    @staticmethod
    def forward(ctx, blocks, kwarg_names, other_kwargs, fixed_point, n_params, x1, x2, *rest):
        params, kwarg_tensors = rest[:n_params], rest[n_params:]
        kwargs = {**other_kwargs, **dict(zip(kwarg_names, kwarg_tensors))}
        record_rng = any(m.training for b in blocks for m in b.f_modules + b.g_modules)
        rng_states = []
        arithmetic = FixedPointStreams(x1.dtype) if fixed_point else FLOAT_STREAMS
        with torch.no_grad():
            s1, s2 = arithmetic.enter(x1), arithmetic.enter(x2)
            for block in blocks:
                s1, s2 = block.forward(s1, s2, kwargs, rng_states if record_rng else None, arithmetic)
            y1, y2 = arithmetic.leave(s1), arithmetic.leave(s2)
        ctx.blocks, ctx.kwarg_names, ctx.other_kwargs = blocks, kwarg_names, other_kwargs
        ctx.params, ctx.rng_states = params, rng_states
        ctx.dtype, ctx.fixed_point = x1.dtype, fixed_point
        words, capacities = (arithmetic.stack.words, arithmetic.stack.capacities) if fixed_point else ([], [])
        ctx.n_words, ctx.capacities = len(words), list(capacities)
        device_type = x1.device.type
        ctx.autocast = (device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type))
        # fixed point: the exact grid streams and the remainder words (saved like any tensor, so counted as such)
        ctx.save_for_backward(s1, s2, *words, *kwarg_tensors)
        return y1, y2

    @staticmethod
    def backward(ctx, d_out1, d_out2):
        out1, out2, *rest = ctx.saved_tensors
        words, kwarg_tensors = rest[:ctx.n_words], rest[ctx.n_words:]
        kwargs = {**ctx.other_kwargs, **dict(zip(ctx.kwarg_names, kwarg_tensors))}
        d_out1 = torch.zeros(out1.shape, dtype=ctx.dtype, device=out1.device) if d_out1 is None else d_out1
        d_out2 = torch.zeros(out2.shape, dtype=ctx.dtype, device=out2.device) if d_out2 is None else d_out2
        no_replay = _NoReplay()
        grads: dict[int, torch.Tensor] = {}
        # a fresh stack over the saved words: popping replaces list entries, so a second backward finds them whole
        arithmetic = (FixedPointStreams(ctx.dtype, RemainderStack(list(words), list(ctx.capacities)))
                      if ctx.fixed_point else FLOAT_STREAMS)
        device_type, dtype, enabled = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):  # recompute as the forward computed
            for i in reversed(range(len(ctx.blocks))):
                rng_f, rng_g = (ctx.rng_states[2 * i], ctx.rng_states[2 * i + 1]) if ctx.rng_states else (no_replay, no_replay)
                out1, out2, d_out1, d_out2 = ctx.blocks[i].backward_step(out1, out2, d_out1, d_out2, kwargs, rng_f, rng_g,
                                                                         grads, arithmetic)
        param_grads = tuple(grads.get(id(p)) for p in ctx.params)
        return (None, None, None, None, None, d_out1, d_out2, *param_grads, *([None] * len(kwarg_tensors)))


class _NoReplay:
    def replay(self):
        import contextlib

        return contextlib.nullcontext()


def run_stack(blocks: list[ReversibleBlock], x1, x2, kwargs: dict[str, Any], reversible: bool = True,
              segment_layers: int | None = None, fixed_point: bool = False):
    """Run ``blocks`` on the streams; reversible=False is the same network under ordinary autograd.

    ``segment_layers`` = k splits the stack into segments of k blocks, each its own reversible Function: the
    streams between segments are kept for backward (2 tensors per segment) and reconstruction runs within a
    segment only, so rounding is amplified over at most k blocks instead of the whole depth. None = one segment.
    ``fixed_point`` holds the streams of the reversible run in exact fixed point (see the module docstring): the
    reconstruction is exact at any depth. It changes the forward only by rounding to 2^-FRACTION_BITS.
    """
    if not blocks:
        return x1, x2
    if not reversible:
        for block in blocks:
            x1, x2 = block.forward(x1, x2, kwargs)
        return x1, x2
    if segment_layers is not None and segment_layers < 1:
        raise ValueError(f"segment_layers must be >= 1 (or None for one segment), got {segment_layers}")
    step = segment_layers or len(blocks)
    for start in range(0, len(blocks), step):
        x1, x2 = _run_segment(blocks[start:start + step], x1, x2, kwargs, fixed_point)
    return x1, x2


def _run_segment(blocks: list[ReversibleBlock], x1, x2, kwargs: dict[str, Any], fixed_point: bool = False):
    params, seen = [], set()
    for block in blocks:
        for p in block.params("f") + block.params("g"):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    names = tuple(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    other = {k: v for k, v in kwargs.items() if k not in names}
    return ReversibleStackFunction.apply(blocks, names, other, fixed_point, len(params), x1, x2, *params,
                                         *(kwargs[k] for k in names))


def gradient_errors_by_block(blocks: list[ReversibleBlock], x, kwargs: dict[str, Any],
                             segment_layers: int | None = None, seed: int = 0, fixed_point: bool = False) -> list[float]:
    """Relative error, per block, of the reversible backward's parameter gradients against ordinary autograd.

    Both runs take the same blocks, the input streams (x, x) and the same random gradient on the final feature
    (x1 + x2) / 2, in the dtype of ``x``. Entry i is ||g_rev - g_ref|| / ||g_ref|| over block i's trainable
    parameters (blocks without any give nan). Dropout should be off (modules in eval mode): the plain run does not
    replay RNG states. In fp32, reconstruction divides rounding by lam·beta once per block, so the error grows
    from the top block down; ``segment_layers`` bounds that growth to the blocks of one segment.
    """
    params = []
    for block in blocks:
        f_ids = {id(p) for p in block.params("f")}
        params.append([*block.params("f"), *(p for p in block.params("g") if id(p) not in f_ids)])
    flat, seen = [], set()
    for group in params:
        for p in group:
            if id(p) not in seen:
                seen.add(id(p))
                flat.append(p)
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def grads(reversible: bool) -> dict[int, torch.Tensor]:
        with torch.enable_grad():
            y1, y2 = run_stack(blocks, x, x, kwargs, reversible=reversible, segment_layers=segment_layers,
                               fixed_point=fixed_point)
            feature = (y1 + y2) / 2
            upstream = torch.randn(feature.shape, generator=generator.manual_seed(seed), dtype=feature.dtype).to(feature.device)
            found = torch.autograd.grad(feature, flat, upstream, allow_unused=True)
        return {id(p): g for p, g in zip(flat, found)}

    got, want = grads(True), grads(False)
    errors = []
    for group in params:
        pairs = [(torch.zeros_like(want[id(p)]) if got[id(p)] is None else got[id(p)], want[id(p)])
                 for p in group if want[id(p)] is not None]
        if not pairs:
            errors.append(float("nan"))
            continue
        diff = sum(float((g - w).double().norm() ** 2) for g, w in pairs) ** 0.5
        norm = sum(float(w.double().norm() ** 2) for _, w in pairs) ** 0.5
        errors.append(diff / max(norm, 1e-300))
    return errors
