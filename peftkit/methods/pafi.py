"""PaFi (Liao, Meng & Monz, ACL 2023): sparse fine-tuning of the smallest-magnitude pretrained weights.

The mask is chosen once, before any task data is seen, from the pretrained weights alone: the
k = round(rho * N) entries of the pool with the smallest |w| (ties go to the lowest position, so the
mask is a pure function of the base weights and can be recomputed). The pool is every weight matrix
of the transformer blocks (optionally their biases too); embeddings and LayerNorm are left out and
the task head always trains in full.

How only k entries train, without a dense optimizer state: each pooled tensor stays frozen and gets
a parametrization holding its selected entries as a 1-D Parameter (``values``) at fixed flat
positions (``indices``, a buffer). The forward reads ``base.scatter(indices, values)``. Entries
outside the mask are read from the frozen tensor, so no gradient, weight decay or optimizer state
can move them, and AdamW keeps state for k numbers instead of N. A Linear (or Conv1D) whose weight is
parametrized runs ``sparse_forward`` (peftkit.models.efficient_linear) rather than reading the assembled
weight: the result is the same, but nothing weight-sized is kept for backward.

Saved: indices + values per tensor and the head (safetensors), options (json). Merging replaces each
parametrized tensor by its scattered value: a plain model of the base architecture.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from pydantic import StrictBool, field_validator
from torch import nn
from torch.nn.utils import parametrize

from peftkit.config import MethodArgs, option
from peftkit.errors import UserError
from peftkit.methods.base import (
    ADAPTER_FILE,
    NO_DECAY_MARKERS,
    Method,
    mark_only_head_trainable,
    parametrizations_of,
)
from peftkit.models.efficient_linear import (
    install_forward,
    layout_of,
    sparse_linear,
    uninstall_forward,
)
from peftkit.utils.registry import METHODS

INDEX_SUFFIX, VALUE_SUFFIX = ".indices", ".values"


class PaFiOptions(MethodArgs):
    rho: float = option(0.005, "Trainable fraction of the pool: k = round(rho * N) entries (the paper's budget is ~0.5%).",
                        gt=0, lt=1)
    include_bias: StrictBool = option(False, "Also put the biases of the pooled weight matrices' layers in the pool.")
    per_layer: StrictBool = option(False, "Rank within each tensor (round(rho * N_i) entries each) instead of across the whole pool.")
    patterns: Optional[list[str]] = option(
        None, "Regular expressions searched in parameter names (e.g. 'intermediate'); only matching tensors join the pool.",
        min_length=1)

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, patterns: Optional[list[str]]) -> Optional[list[str]]:
        for pattern in patterns or []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({e})") from None
        return patterns


class SparseEntries(nn.Module):
    """Parametrization of one frozen tensor: ``values`` written at its flat positions ``indices``."""

    def __init__(self, base: torch.Tensor, indices: torch.Tensor):
        super().__init__()
        self.register_buffer("indices", indices.to(device=base.device, dtype=torch.long))
        self.values = nn.Parameter(base.detach().reshape(-1)[self.indices].clone())

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base.reshape(-1).scatter(0, self.indices, self.values).reshape(base.shape)


def sparse_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of a Linear/Conv1D whose weight carries SparseEntries, without assembling it under autograd."""
    weight = module.parametrizations["weight"] if parametrize.is_parametrized(module, "weight") else None
    if weight is None or len(weight) != 1 or not isinstance(weight[0], SparseEntries):
        return type(module).forward(module, x)  # the chain changed since prepare: assemble it as usual
    entries = weight[0]
    return sparse_linear(x, weight.original, entries.indices, entries.values, module.bias, layout=layout_of(module))


def smallest_entries(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat positions of the k smallest scores; ties at the threshold go to the lowest positions."""
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    threshold = torch.kthvalue(scores, k).values
    below = (scores < threshold).nonzero().flatten()
    tied = (scores == threshold).nonzero().flatten()[: k - below.numel()]
    return torch.cat([below, tied]).sort().values


def pool_of(model, options: PaFiOptions) -> dict[str, tuple[nn.Module, str]]:
    """Tensors PaFi may train: name -> (owning module, attribute), in model order.

    Weight matrices (2-D ``weight``) of the modules inside the transformer blocks — Linear and
    GPT-2's Conv1D; LayerNorm (1-D) is not one — plus their biases when ``include_bias``.
    """
    from peftkit.models.families import layers_of

    names = {id(m): n for n, m in model.named_modules()}
    patterns = [re.compile(p) for p in options.patterns or []]
    pool = {}
    for module in layers_of(model).modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.ndim != 2 or isinstance(module, nn.Embedding):
            continue
        attrs = ["weight"] + (["bias"] if options.include_bias and isinstance(module.bias, nn.Parameter) else [])
        for attr in attrs:
            name = f"{names[id(module)]}.{attr}"
            if not patterns or any(p.search(name) for p in patterns):
                pool[name] = (module, attr)
    return pool


def select_mask(pool: dict[str, tuple[nn.Module, str]], options: PaFiOptions) -> dict[str, torch.Tensor]:
    """name -> sorted flat indices of the entries that train (tensors with none are left out)."""
    tensors = {name: getattr(module, attr).detach() for name, (module, attr) in pool.items()}
    scores = {name: t.abs().float().reshape(-1) for name, t in tensors.items()}
    if options.per_layer:
        chosen = {name: smallest_entries(s, round(options.rho * s.numel())) for name, s in scores.items()}
    else:
        device = next(iter(scores.values())).device
        flat = torch.cat([s.to(device) for s in scores.values()])
        picked = smallest_entries(flat, round(options.rho * flat.numel()))
        chosen, offset = {}, 0
        for name, s in scores.items():
            inside = picked[(picked >= offset) & (picked < offset + s.numel())]
            chosen[name] = (inside - offset).to(s.device)
            offset += s.numel()
    return {name: idx for name, idx in chosen.items() if idx.numel() > 0}


def sparse_entries(model) -> dict[str, SparseEntries]:
    """name of the parametrized tensor (e.g. '...query.weight') -> its SparseEntries."""
    return parametrizations_of(model, SparseEntries)


@METHODS.register("pafi", help="PaFi: sparse fine-tuning of the smallest-magnitude pretrained weights.")
class PaFi(Method):
    name = "pafi"
    Options = PaFiOptions
    can_merge = True
    unmerged_export = "delta"

    def prepare(self, model):
        options = self.options
        pool = pool_of(model, options)
        if not pool:
            raise UserError(f"PaFi found no weight matrices to train (patterns={options.patterns}). "
                            "Check method.patterns against the model's parameter names, or remove it.")
        mask = select_mask(pool, options)
        if not mask:
            size = sum(getattr(m, a).numel() for m, a in pool.values())
            raise UserError(f"PaFi: rho={options.rho} selects no entry of a pool of {size} entries. Raise method.rho.")
        return self.attach(model, {name: (pool[name], idx) for name, idx in mask.items()})

    def attach(self, model, targets: dict[str, tuple[tuple[nn.Module, str], torch.Tensor]]):
        """Freeze all but the head and give each target tensor its trainable entries."""
        mark_only_head_trainable(model)
        for (module, attr), indices in targets.values():
            parametrize.register_parametrization(module, attr, SparseEntries(getattr(module, attr), indices))
        for (module, attr), _ in targets.values():
            chain = module.parametrizations[attr]
            if attr == "weight" and layout_of(module) is not None and len(chain) == 1:
                install_forward(module, sparse_forward)
        return model

    def param_groups(self, model, weight_decay: float):
        # The sparse values of weight matrices are weights (decayed like full fine-tuning decays them);
        # those of biases and every bias/LayerNorm of the head are not. Values are 1-D, hence explicit.
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if name.endswith(".parametrizations.weight.0.values"):
                decay.append(param)
            elif any(m in name for m in NO_DECAY_MARKERS) or param.ndim < 2:
                no_decay.append(param)
            else:
                decay.append(param)
        groups = [{"params": decay, "weight_decay": weight_decay}] if decay else []
        return groups + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])

    def trainable_state(self, model):
        entries = sparse_entries(model)
        state = {}
        for name, e in entries.items():
            state[name + INDEX_SUFFIX] = e.indices.to(torch.int32) if e.indices.numel() < 2**31 else e.indices
            state[name + VALUE_SUFFIX] = e.values.detach()
        sparse_params = {id(e.values) for e in entries.values()}
        for name, param in model.named_parameters():
            if param.requires_grad and id(param) not in sparse_params:
                state[name] = param.detach()
        return state

    def load_trainable_state(self, model, state):
        entries = sparse_entries(model)
        with torch.no_grad():
            for name, e in entries.items():
                if name + VALUE_SUFFIX not in state:
                    raise ValueError(f"state lacks the sparse values of {name}")
                saved = state.get(name + INDEX_SUFFIX)
                if saved is not None and not torch.equal(saved.to(e.indices), e.indices):
                    raise ValueError(f"the saved mask of {name} differs from this model's: was it made from another base?")
                e.values.copy_(state[name + VALUE_SUFFIX])
            rest = {k: v for k, v in state.items() if not k.endswith((INDEX_SUFFIX, VALUE_SUFFIX))}
            extra = [k[: -len(VALUE_SUFFIX)] for k in state if k.endswith(VALUE_SUFFIX) and k[: -len(VALUE_SUFFIX)] not in entries]
            if extra:
                raise ValueError(f"state has sparse values for tensors this model does not train: {extra[:5]}")
            super().load_trainable_state(model, rest)

    def load(self, base_model, in_dir):
        """Rebuild the parametrizations from the saved indices (no re-ranking needed), then restore values and head."""
        from pathlib import Path

        from safetensors.torch import load_file

        state = load_file(str(Path(in_dir) / ADAPTER_FILE))
        targets = {}
        for key, indices in state.items():
            if key.endswith(INDEX_SUFFIX):
                name = key[: -len(INDEX_SUFFIX)]
                module_name, attr = name.rsplit(".", 1)
                targets[name] = ((base_model.get_submodule(module_name), attr), indices.long())
        model = self.attach(base_model, targets)
        self.load_trainable_state(model, state)
        return model

    def export_delta(self, model):
        """Each sparse tensor as "scatter" (its flat positions and new entries), the head as "replace"."""
        entries = sparse_entries(model)
        delta = {name: ("scatter", {INDEX_SUFFIX: e.indices.to(torch.int32) if e.indices.numel() and
                                    int(e.indices.max()) < 2**31 else e.indices, VALUE_SUFFIX: e.values.detach()})
                 for name, e in entries.items()}
        sparse = {id(e.values) for e in entries.values()}
        delta.update({n: ("replace", {"": p.detach()}) for n, p in model.named_parameters()
                      if p.requires_grad and id(p) not in sparse})
        return delta

    def merge(self, model):
        """Write the scattered tensors into the plain parameters and drop the parametrizations (in place)."""
        for module in list(model.modules()):
            if parametrize.is_parametrized(module):
                for attr in list(module.parametrizations):
                    if all(isinstance(p, SparseEntries) for p in module.parametrizations[attr]):
                        parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
                        uninstall_forward(module)
        return model
