"""peft's Super-Tuning tuner (peft.SupertuningConfig) with smallest-magnitude selection: a PaFi peer.

peft freezes each targeted Linear and trains a 1-D vector of entries at fixed flat positions, chosen
per weight matrix by |w| (``select_top=False`` keeps the smallest). Differences from our PaFi, kept
as they are in peft: the ranking is always per matrix (never global), the count per matrix is
floor(N_i * (1 - sparsity)) with sparsity = 1 - rho, the values are deltas added to the frozen weight
(weight decay pulls them back towards the pretrained entry, not towards zero), and ties are broken by
torch.topk. The task head trains in full and is saved with the adapter (``modules_to_save``).
"""

from __future__ import annotations

from typing import Literal, Optional

from peftkit.config import MethodArgs, option
from peftkit.methods.lora import DEFAULT_TARGETS
from peftkit.methods.peft_backed import PeftBackedMethod, head_modules
from peftkit.utils.registry import METHODS


class SuperTuningOptions(MethodArgs):
    rho: float = option(0.005, "Trainable fraction of each targeted weight matrix (peft's sparsity = 1 - rho).", gt=0, lt=1)
    select: Literal["smallest", "largest"] = option("smallest", "Which end of |w| trains: smallest (PaFi-like) or largest.")
    targets: Optional[list[str]] = option(None, "Module names to adapt; null = every attention and FFN projection of the "
                                                "family.", min_length=1)


@METHODS.register("supertuning", help="peft's magnitude-selected sparse tuner (a PaFi peer).")
class SuperTuning(PeftBackedMethod):
    name = "supertuning"
    Options = SuperTuningOptions

    def peft_config(self, model):
        from peft import SupertuningConfig

        from peftkit.models.families import family_of

        options, heads = self.options, head_modules(model)
        return SupertuningConfig(target_modules=options.targets or DEFAULT_TARGETS[family_of(model).name],
                                 modules_to_save=heads or None, sparsity=1.0 - options.rho,
                                 select_top=options.select == "largest")

