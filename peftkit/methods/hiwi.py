"""HiWi (Liao, Meng & Monz, ACL 2023): an adapter applied to pretrained FFN parameters, then merged away.

A classic adapter transforms hidden states at every forward, so it stays in the deployed model and
adds latency. HiWi feeds the pretrained parameter P itself (an FFN weight matrix or bias vector) to
the adapter:  P' = P + ReLU(P · W_down) · W_up,  row by row (a bias is a single row). W_up starts at
zero, so P' = P at initialisation. During training the forward recomputes P' each step (a
parametrization of P); afterwards P' is computed once and the adapter is thrown away: the deployed
model is the pretrained architecture with new FFN parameters, at full fine-tuning's speed.
With target="weight" the training forward never assembles P' either: ``row_adapted_forward`` applies the
adapter like LoRA (x·Pᵀ plus x through the two thin factors), so no weight-sized tensor is kept for backward.

A zero parameter stays zero (f(0) = 0): HiWi needs the non-zero pretrained values it adapts. The bias variant
warns when a model's FFN biases are zero (a randomly initialised model's are: only the head would train) and refuses
a model whose FFN layers have no bias at all.

target="bias" adapts only the FFN biases, and ``save`` then stores just the new biases (plus the task
head): ~0.03% of a RoBERTa-large-sized model, however large the bottleneck. target="weight" adapts
the FFN weight matrices and saves the adapters, which are far smaller than the matrices they make.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from peftkit.config import MethodArgs, option
from peftkit.errors import RunFailed, UserError
from peftkit.methods.base import (
    ADAPTER_FILE,
    Method,
    mark_only_head_trainable,
    parametrizations_of,
)
from peftkit.models.efficient_linear import (
    install_forward,
    layout_of,
    row_adapted_linear,
    uninstall_forward,
)
from peftkit.utils.registry import METHODS


class HiWiOptions(MethodArgs):
    target: Literal["weight", "bias"] = option("weight", "FFN parameters fed to the adapter: the weight matrices or the biases.")
    r: int = option(8, "Bottleneck of each adapter (W_down: width x r, W_up: r x width).", ge=1, le=65536)


class WeightAdapter(nn.Module):
    """Parametrization P -> P + ReLU(P · W_down) · W_up over the rows of P (a vector is one row)."""

    def __init__(self, param: torch.Tensor, r: int):
        super().__init__()
        width = param.shape[-1]
        kw = {"dtype": param.dtype, "device": param.device}
        # W_down like nn.Linear's default init (uniform, bound 1/sqrt(fan_in)); W_up zero so P' = P at start.
        bound = 1.0 / math.sqrt(width)
        down = torch.empty(width, r, **kw).uniform_(-bound, bound)
        rows = param.detach().reshape(-1, width)
        if rows.shape[0] == 1:
            down = aligned_with(rows[0], down)
        else:
            # A unit whose pre-activations sum below zero over the rows starts negative on most of them, nearly dead;
            # negating such columns (the init distribution is symmetric) turns each of them the other way.
            pre_activation = (rows @ down).sum(0)
            down[:, pre_activation < 0] *= -1
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(torch.zeros(r, width, **kw))

    def forward(self, param: torch.Tensor) -> torch.Tensor:
        rows = param.reshape(-1, param.shape[-1])
        return param + (torch.relu(rows @ self.down) @ self.up).reshape(param.shape)


def aligned_with(row: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down`` with every entry given the sign of ``row``'s entry it multiplies: a pre-activation row·W_down[:, j]
    of Σ|row_i|·|W_ij|, about ||row||_1·bound/2, positive with a margin.

    Why a bias needs it: a bias is ONE row, so each bottleneck unit has a single pre-activation h_j = P·W_down[:, j],
    and once h_j <= 0 the unit is dead for good (no gradient reaches its W_down column or W_up row; P is frozen).
    The gradient of W_down[:, j] is P times one number, so AdamW, whose steps are about lr per entry whatever the
    gradient's size, moves h_j by up to lr·||P||_1 per step. A column of random signs starts h_j near
    ||P||_2·bound/sqrt(3), about sqrt(width) times closer to zero: at the MiniLM recipes' former lr 3e-3 all 96
    units died within 20 steps and the biases never moved. Aligned, h_j sits bound/(2·lr) full-rate steps from
    zero, about 40 steps at the recipes' lr 3e-4 where a random-sign column has about one. The margin does not replace
    a suitable lr (at 1e-3, 77 of 96 units still died on MRPC; at 3e-4 none did). With one row the column's direction
    carries nothing else (the adapter adds sum_j ReLU(h_j)·W_up[j] to P), so only the start point differs from the
    random init, not what the adapter can express."""
    return down.abs() * torch.where(row < 0, -1.0, 1.0).to(down.dtype).unsqueeze(1)


def dead_units_by_tensor(model) -> dict[str, tuple[int, int]]:
    """name of each adapted tensor that is not all zero -> (dead units, r).

    Unit j of an adapter is dead when its pre-activation (P·W_down)[:, j] is <= 0 on every row of P: ReLU then
    passes 0 and a zero gradient, so neither its W_down column nor its W_up row changes again. The count is exact,
    not a sample: the rows a unit sees are the rows of the pretrained P, which training never changes. An adapter
    whose r units are all dead leaves its tensor frozen. Adapters on an all-zero parameter are left out: they could
    never move it (``bias_targets`` warns about them at prepare)."""
    counts = {}
    with torch.no_grad():
        for name, adapter in adapted_tensors(model).items():
            module_name, attr = name.rsplit(".", 1)
            original = model.get_submodule(module_name).parametrizations[attr].original
            rows = original.reshape(-1, original.shape[-1])
            if not bool(rows.any()):
                continue
            best = (rows @ adapter.down).amax(0)
            counts[name] = (int((best <= 0).sum()), best.numel())
    return counts


def dead_units(model) -> tuple[int, int]:
    """(dead, total) bottleneck units over the adapters whose parameter is not all zero (``dead_units_by_tensor``)."""
    counts = dead_units_by_tensor(model).values()
    return sum(dead for dead, _ in counts), sum(r for _, r in counts)


def row_adapted_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of a Linear/Conv1D whose weight carries a WeightAdapter, without assembling P' for backward.

    Only while gradients flow to the adapter: otherwise nothing is saved anyway, and the assembled P' gives
    outputs bit-identical to the merged model's (the factored sum rounds differently).
    """
    weight = module.parametrizations["weight"] if parametrize.is_parametrized(module, "weight") else None
    if weight is None or len(weight) != 1 or not isinstance(weight[0], WeightAdapter):
        return type(module).forward(module, x)  # the chain changed since prepare: assemble it as usual
    adapter = weight[0]
    if not (torch.is_grad_enabled() and (adapter.down.requires_grad or adapter.up.requires_grad)):
        return type(module).forward(module, x)
    return row_adapted_linear(x, weight.original, adapter.down, adapter.up, module.bias, layout=layout_of(module))


def adapted_tensors(model) -> dict[str, WeightAdapter]:
    """name of the adapted tensor (e.g. '...intermediate.dense.bias') -> its WeightAdapter."""
    return parametrizations_of(model, WeightAdapter)


def model_label(model) -> str:
    """'the bert model all-MiniLM-L6-v2' (the checkpoint's name or path when it has one), for messages."""
    from peftkit.models.families import family_of

    source = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return f"the {family_of(model).name} model" + (f" {source}" if source else " (built from a config, no checkpoint)")


def bias_targets(model, targets: list) -> list:
    """The FFN projections whose bias HiWi can adapt. No bias at all: a UserError (nothing to adapt). Every bias zero:
    a warning, since f(0) = ReLU(0 · W_down) · W_up = 0 keeps a zero bias at zero and only the head would train.
    Some zero or absent: a warning naming how many stay as they are."""
    present = [(name, module) for name, module in targets if isinstance(getattr(module, "bias", None), nn.Parameter)]
    label = model_label(model)
    if not present:
        raise UserError(f"HiWi target='bias': the {len(targets)} FFN projections of {label} have no bias (e.g. "
                        f"{targets[0][0] if targets else 'no FFN layer found'}), so there is nothing for the adapters "
                        f"to adapt and only the task head would train. Use method.target: weight to adapt the FFN weight "
                        f"matrices, or method.name: head-only if training the head alone is what you want.")
    zero = [name for name, module in present if not bool(module.bias.detach().any())]
    absent = len(targets) - len(present)
    if len(zero) == len(present):
        warnings.warn(f"HiWi target='bias' on {label}: all {len(present)} FFN biases are zero"
                      + (f" and {absent} FFN projections have none" if absent else "")
                      + ". HiWi cannot move a zero bias (P + ReLU(P · W_down) · W_up stays 0), so this run trains only "
                      "the task head, like method.name: head-only. Randomly initialised models start with zero biases: "
                      "start from a pretrained checkpoint, or use method.target: weight.", UserWarning, stacklevel=3)
    elif zero or absent:
        warnings.warn(f"HiWi target='bias' on {label}: {len(zero)} of the {len(present)} FFN biases are zero"
                      + (f" and {absent} FFN projections have none" if absent else "")
                      + f"; those stay as they are (HiWi cannot move a zero bias), the other "
                      f"{len(present) - len(zero)} are adapted.", UserWarning, stacklevel=3)
    return present


@METHODS.register("hiwi", help="HiWi: adapter applied to FFN weights/biases, merged away (no latency).")
class HiWi(Method):
    name = "hiwi"
    Options = HiWiOptions
    can_merge = True
    unmerged_export = "delta"
    option_needs = {("target", "bias"): ("mlp_biases",)}  # the bias variant adapts the FFN biases

    def __init__(self, options: HiWiOptions | None = None):
        super().__init__(options)
        self.dead_reported = 0  # the dead-unit count the log last warned about

    def training_note(self, model, step: int) -> str | None:
        """A warning when more bottleneck units have died since the last one; a run failure when all have."""
        counts = dead_units_by_tensor(model)
        dead, total = sum(d for d, _ in counts.values()), sum(r for _, r in counts.values())
        adapted = {"bias": "biases", "weight": "weight matrices"}[self.options.target]
        if total and dead == total:
            raise RunFailed(
                f"HiWi target={self.options.target!r}: all {total} bottleneck units of the adapters are dead at step "
                f"{step} (ReLU(P·W_down) is 0 on every row of P they see, so no gradient reaches W_down or W_up "
                f"again): the FFN {adapted} are frozen at their current values and only the task head would keep "
                f"training. The learning rate is too high for these adapters: lower train.lr (the shipped hiwi-bias "
                f"recipes use 3e-4, at which no unit died in 300 MiniLM steps on MRPC or RTE).")
        if dead <= self.dead_reported:
            return None
        self.dead_reported = dead
        frozen = sum(d == r for d, r in counts.values())
        return (f"HiWi: {dead} of {total} bottleneck units are dead at step {step} (ReLU(P·W_down) is 0 on every row "
                f"of P they see; they will not learn again); {frozen} of the {len(counts)} adapted FFN {adapted} have "
                f"no live unit left and are frozen. If most die, lower train.lr.")

    def prepare(self, model):
        options = self.options
        from peftkit.models.families import family_of, ffn_modules

        targets = ffn_modules(model)
        if options.target == "bias":
            targets = bias_targets(model, targets)
        missing = [name for name, module in targets if not isinstance(getattr(module, options.target, None), nn.Parameter)]
        if missing:
            raise UserError(f"HiWi target={options.target!r}: the FFN layers of this {family_of(model).name} model have no "
                            f"{options.target} (e.g. {missing[0]}). Use method.target: weight for this model.")
        mark_only_head_trainable(model)
        for _, module in targets:
            param = getattr(module, options.target)
            parametrize.register_parametrization(module, options.target, WeightAdapter(param, options.r))
            if options.target == "weight" and layout_of(module) is not None:
                install_forward(module, row_adapted_forward)
        return model

    def adapted_values(self, model) -> dict[str, torch.Tensor]:
        """The current P' of every adapted tensor, by its plain parameter name."""
        values = {}
        with torch.no_grad():
            for name in adapted_tensors(model):
                module_name, attr = name.rsplit(".", 1)
                values[name] = getattr(model.get_submodule(module_name), attr).detach()
        return values

    def head_state(self, model) -> dict[str, torch.Tensor]:
        adapter_params = {id(p) for a in adapted_tensors(model).values() for p in a.parameters()}
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_params}

    def save(self, model, out_dir):
        """Bias variant: only the new biases and the head. Weight variant: the adapters and the head."""
        if self.options.target != "bias":
            return super().save(model, out_dir)
        from safetensors.torch import save_file

        state = {**self.adapted_values(model), **self.head_state(model)}
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(Path(out_dir) / ADAPTER_FILE))

    def load(self, base_model, in_dir):
        """Bias variant: copy the stored biases and head into the plain base model (nothing to merge)."""
        if self.options.target != "bias":
            return super().load(base_model, in_dir)
        from safetensors.torch import load_file

        state = load_file(str(Path(in_dir) / ADAPTER_FILE))
        mark_only_head_trainable(base_model)
        self.load_trainable_state(base_model, state)
        return base_model

    def export_delta(self, model):
        """Weight variant: each adapter as "row_adapter" (down, up). Bias variant: the new FFN biases as "replace".
        The head as "replace" in both."""
        delta = {name: ("row_adapter", {".down": a.down.detach(), ".up": a.up.detach()})
                 for name, a in adapted_tensors(model).items()} if self.options.target == "weight" else {}
        if self.options.target == "bias":
            from peftkit.models.families import ffn_modules

            values = self.adapted_values(model) or {f"{n}.bias": m.bias.detach() for n, m in ffn_modules(model)
                                                    if m.bias is not None}
            delta.update({n: ("replace", {"": v}) for n, v in values.items()})
        delta.update({n: ("replace", {"": v}) for n, v in self.head_state(model).items()})
        return delta

    def merge(self, model):
        """Compute every P' once and keep it as the plain parameter; the adapters are dropped (in place)."""
        for module in list(model.modules()):
            if parametrize.is_parametrized(module):
                for attr in list(module.parametrizations):
                    if all(isinstance(p, WeightAdapter) for p in module.parametrizations[attr]):
                        parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
                        uninstall_forward(module)
        return model
