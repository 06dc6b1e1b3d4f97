"""peft's Super-Tuning tuner (peft.SupertuningConfig) with smallest-magnitude selection: a PaFi peer.

peft freezes each targeted Linear and trains a 1-D vector of entries at fixed flat positions, chosen
per weight matrix by |w| (``select_top=False`` keeps the smallest). Differences from our PaFi, kept
as they are in peft: the ranking is always per matrix (never global), the count per matrix is
floor(N_i * (1 - sparsity)) with sparsity = 1 - rho, the values are deltas added to the frozen weight
(weight decay pulls them back towards the pretrained entry, not towards zero), and ties are broken by
torch.topk. The task head trains in full and is saved with the adapter (``modules_to_save``).

peft's layer forward assembles W0 + scatter(values) and hands it to F.linear, which keeps that weight-sized
tensor for backward. ``prepare`` gives each of peft's Super-Tuning Linears ``sparse_forward`` instead (the same
output through peftkit.models.efficient_linear.sparse_linear, nothing weight-sized saved); peft's own forward
still runs whenever the layer is merged, disabled, or has a LoRA part (peft's Supra mode, r set).
"""

from __future__ import annotations

from typing import Literal, Optional

from peftkit.config import MethodArgs, option
from peftkit.methods.lora import default_targets
from peftkit.methods.peft_backed import PeftBackedMethod, head_modules
from peftkit.utils.registry import METHODS


class SuperTuningOptions(MethodArgs):
    rho: float = option(0.005, "Trainable fraction of each targeted weight matrix (peft's sparsity = 1 - rho).", gt=0, lt=1)
    select: Literal["smallest", "largest"] = option("smallest", "Which end of |w| trains: smallest (PaFi-like) or largest.")
    targets: Optional[list[str]] = option(None, "Module names to adapt; null = every attention and FFN projection of the "
                                                "model's blocks.", min_length=1)


def sparse_forward(module, x, *args, **kwargs):
    """peft's Super-Tuning Linear forward for active sparse-only adapters, through ``sparse_linear``."""
    import torch

    from peftkit.models.efficient_linear import sparse_linear

    active = [a for a in module.active_adapters if a in module.supertuning_values.keys()]
    if (module.disable_adapters or module.merged or not active
            or any(module.supertuning_rank[a] > 0 for a in active)):
        return type(module).forward(module, x, *args, **kwargs)
    base = module.get_base_layer()
    dtype = base.weight.dtype
    if len(active) == 1:  # the int32 buffer itself: a widened copy would be a new tensor kept for backward
        indices = module.supertuning_indices[active[0]]
        values = module.supertuning_values[active[0]].to(dtype)
    else:  # several adapters add their entries onto the same weight: one scatter_add of all of them
        indices = torch.cat([module.supertuning_indices[a].to(torch.int64) for a in active])
        values = torch.cat([module.supertuning_values[a].to(dtype) for a in active])
    return sparse_linear(x, base.weight, indices, values, base.bias, accumulate=True)


def use_sparse_forward(model) -> int:
    """Give every plain-Linear Super-Tuning layer of ``model`` ``sparse_forward``; returns how many."""
    from peft.tuners.supertuning.layer import Linear as SuperTuningLinear

    from peftkit.models.efficient_linear import install_forward, layout_of

    count = 0
    for module in model.modules():
        if type(module) is SuperTuningLinear and layout_of(module.get_base_layer()) == "linear":
            install_forward(module, sparse_forward)
            count += 1
    return count


@METHODS.register("supertuning", help="peft's magnitude-selected sparse tuner (a PaFi peer).")
class SuperTuning(PeftBackedMethod):
    name = "supertuning"
    Options = SuperTuningOptions
    needs = ("linear_projections", "nn_linear_projections")  # peft's Super-Tuning adapts nn.Linear layers only

    def prepare(self, model):
        model = super().prepare(model)
        use_sparse_forward(model)
        return model

    def peft_config(self, model):
        from peft import SupertuningConfig

        options, heads = self.options, head_modules(model)
        return SupertuningConfig(target_modules=options.targets or default_targets(model),
                                 modules_to_save=heads or None, sparsity=1.0 - options.rho,
                                 select_top=options.select == "largest")

