"""Linear layers whose weight is a frozen base plus a small trainable change, without a weight-sized tensor
kept for backward.

Written the obvious way — build the effective weight W = W0 + delta, then ``F.linear(x, W)`` — autograd keeps W
alive until backward because the gradient of the input needs it, and W is a fresh tensor of the base weight's
size for every adapted layer. Full fine-tuning does not pay this (there W is the parameter itself), so a method
that trains 0.5% of the entries ends up holding more memory for backward than full fine-tuning does.

Two ways around it, by the shape of delta:

* sparse (PaFi, peft's Super-Tuning): delta is a few entries at fixed flat positions. ``sparse_linear`` is an
  autograd Function that saves the input, the base parameter and the small index/value tensors, and rebuilds W in
  backward. d loss / d values is (grad_out^T x) read at the positions; that product is a grad-sized temporary of
  the backward pass, never something held between forward and backward.
* low rank (HiWi on weight matrices): delta = ReLU(W0 · W_down) · W_up over the rows of W0. Applied like LoRA —
  x · W0^T plus x through the two thin factors — so autograd only keeps thin (tokens x r, width x r) tensors.

The methods keep their parametrizations (names, optimizer groups, saving and merging are unchanged) and give each
adapted module an instance-level ``forward`` that reads the parametrization's pieces instead of the assembled
weight. ``reference_forward`` switches those back off for a while, to compare against the plain autograd path.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator, Literal, Optional

import torch
from torch import nn

Layout = Literal["linear", "conv1d"]

# Functions install_forward has put on instances; anything else found in a module's __dict__ under "forward"
# (accelerate's hooks, for one) belongs to someone else and is left alone.
_INSTALLED_FUNCTIONS: set[Callable] = set()


def layout_of(module: nn.Module) -> Optional[Layout]:
    """How ``module`` applies its weight: "linear" (y = x W^T + b, W is out x in), "conv1d" (GPT-2's Conv1D:
    y = x W + b, W is in x out), or None when its forward is something else (a subclass with its own forward,
    e.g. a quantized Linear), which must keep the plain path."""
    forward = type(module).forward
    if forward is nn.Linear.forward:
        return "linear"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return "conv1d" if forward is Conv1D.forward else None


# ---- sparse change: W = W0 with entries written (or added) at fixed flat positions ---------------------------
def effective_sparse_weight(base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, accumulate: bool):
    """W0 with ``values`` written at the flat ``indices`` (added to W0's entries when ``accumulate``)."""
    flat, indices = base.reshape(-1), indices.long()
    values = values.to(base.dtype)
    flat = flat.scatter_add(0, indices, values) if accumulate else flat.scatter(0, indices, values)
    return flat.view(base.shape)


class SparseLinearFunction(torch.autograd.Function):
    """y = x · W^T + b (``transposed``: x · W + b) with W = effective_sparse_weight(base, indices, values)."""

    @staticmethod
    def forward(ctx, x, base, indices, values, bias, accumulate: bool, transposed: bool):
        weight = effective_sparse_weight(base, indices, values, accumulate)
        out = torch.nn.functional.linear(x, weight.t() if transposed else weight, bias)
        ctx.accumulate, ctx.transposed = accumulate, transposed
        device_type = x.device.type
        ctx.autocast = (device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type))
        ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
        # x is only needed for the gradient of the values; W is rebuilt from base (a parameter, already resident)
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, base, indices, values)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, base, indices, values = ctx.saved_tensors
        grad_x = grad_values = grad_bias = None
        device_type, dtype, enabled = ctx.autocast
        # the products run under the forward's autocast state, so their precision is the one autograd would use
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            if ctx.needs_input_grad[0]:
                weight = effective_sparse_weight(base, indices, values, ctx.accumulate)
                grad_x = (grad_out @ (weight.t() if ctx.transposed else weight)).to(ctx.x_dtype)
                del weight
            if ctx.needs_input_grad[3]:
                g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
                grad_weight = x2.t() @ g2 if ctx.transposed else g2.t() @ x2  # laid out like base
                grad_values = grad_weight.reshape(-1).gather(0, indices.long()).to(values.dtype)
                del grad_weight
        if ctx.needs_input_grad[4]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_values, grad_bias, None, None


def sparse_linear(x: torch.Tensor, base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, *, accumulate: bool = False, layout: Layout = "linear"):
    """The layer's output with weight ``base`` changed at the flat ``indices`` to ``values`` (or by ``values`` when
    ``accumulate``), saving nothing weight-sized for backward. ``indices`` must not repeat unless ``accumulate``;
    they may be int32 (peft stores them so): they are widened where used, not kept widened until backward."""
    return SparseLinearFunction.apply(x, base, indices, values, bias, accumulate, layout == "conv1d")


# ---- low-rank change: W = W0 + ReLU(W0 · W_down) · W_up over the rows of W0 ---------------------------------
def row_adapted_linear(x: torch.Tensor, base: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, *, layout: Layout = "linear"):
    """The layer's output with weight W0 + ReLU(W0 · down) · up (rows of W0 as stored), as x·W0 plus x through
    the two thin factors: nothing weight-sized exists, in forward or backward.

    Linear (W0: out x in, rows of length in): y = x W0^T + (x up^T) H^T with H = ReLU(W0 down), out x r.
    Conv1D (W0: in x out, rows of length out): y = x W0 + (x H) up with H = ReLU(W0 down), in x r.
    """
    hidden = torch.relu(base @ down)
    if layout == "conv1d":
        return torch.nn.functional.linear(x, base.t(), bias) + (x @ hidden) @ up
    return torch.nn.functional.linear(x, base, bias) + torch.nn.functional.linear(x @ up.t(), hidden)


# ---- installing the forwards on modules ------------------------------------------------------------------------
def install_forward(module: nn.Module, forward: Callable) -> None:
    """Make ``module`` run ``forward(module, ...)`` in place of its class's forward."""
    _INSTALLED_FUNCTIONS.add(forward)
    module.forward = types.MethodType(forward, module)


def installed_forward(module: nn.Module) -> Optional[Callable]:
    """The function ``install_forward`` set on ``module``, or None."""
    bound = module.__dict__.get("forward")
    func = getattr(bound, "__func__", None)
    return func if func in _INSTALLED_FUNCTIONS and getattr(bound, "__self__", None) is module else None


def uninstall_forward(module: nn.Module) -> None:
    """Back to the class's forward (no-op where nothing was installed)."""
    if installed_forward(module) is not None:
        del module.__dict__["forward"]


def installed_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if installed_forward(m) is not None]


@contextlib.contextmanager
def reference_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every installed forward is off: the modules run their class's forward, which reads the
    assembled (parametrized) weight under plain autograd. For comparisons and measurements."""
    saved = [(m, m.__dict__["forward"]) for m in installed_modules(model)]
    for module, _ in saved:
        del module.__dict__["forward"]
    try:
        yield model
    finally:
        for module, bound in saved:
            module.__dict__["forward"] = bound
