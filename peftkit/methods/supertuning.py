"""peft's Super-Tuning tuner (peft.SupertuningConfig) with smallest-magnitude selection: a PaFi peer.

peft freezes each targeted Linear and trains a 1-D vector of entries at fixed flat positions, chosen
per weight matrix by |w| (``select_top=False`` keeps the smallest). Differences from our PaFi, kept
as they are in peft: the ranking is always per matrix (never global), the count per matrix is
floor(N_i * (1 - sparsity)) with sparsity = 1 - rho, the values are deltas added to the frozen weight
(weight decay pulls them back towards the pretrained entry, not towards zero), and ties are broken by
torch.topk. The task head trains in full and is saved with the adapter (``modules_to_save``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from peftkit.methods.base import Method
from peftkit.methods.lora import DEFAULT_TARGETS, HEAD_MODULES
from peftkit.utils.options import option


@dataclass
class SuperTuningOptions:
    rho: float = option(0.005, "Trainable fraction of each targeted weight matrix (peft's sparsity = 1 - rho).")
    select: Literal["smallest", "largest"] = option("smallest", "Which end of |w| trains: smallest (PaFi-like) or largest.")
    targets: Optional[list[str]] = option(None, "Module names to adapt; None = every attention and FFN projection of the family.")

    def validate(self) -> list[str]:
        return [] if 0 < self.rho < 1 else [f"rho: must be strictly between 0 and 1, got {self.rho}"]


class SuperTuning(Method):
    name = "supertuning"
    Options = SuperTuningOptions
    can_merge = True

    def peft_config(self, model, options: SuperTuningOptions):
        from peft import SupertuningConfig

        from peftkit.models.families import family_of

        heads = [h for h in HEAD_MODULES if hasattr(model, h)]
        return SupertuningConfig(target_modules=options.targets or DEFAULT_TARGETS[family_of(model).name],
                                 modules_to_save=heads or None, sparsity=1.0 - options.rho,
                                 select_top=options.select == "largest")

    def prepare(self, model, options: SuperTuningOptions):
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(model, options))

    def trainable_state(self, model):
        from peft import get_peft_model_state_dict

        return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}

    def load_trainable_state(self, model, state):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter state has unexpected keys: {result.unexpected_keys[:5]}")

    def save(self, model, out_dir, options):
        model.save_pretrained(out_dir, safe_serialization=True)
        self.save_options(out_dir, options)

    def load(self, base_model, in_dir, options):
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, in_dir, is_trainable=False)

    def merge(self, model):
        return model.merge_and_unload()

    def unwrap(self, model):
        return model.get_base_model()
