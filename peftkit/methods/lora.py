"""LoRA (Hu et al., 2021) through huggingface/peft.

The task head (classifier/score) is listed in ``modules_to_save`` so that it trains in full and
is stored with the adapter: a saved LoRA run reloads to the same logits.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import StrictBool

from peftkit.config import MethodArgs, option
from peftkit.methods.peft_backed import PeftBackedMethod, head_modules
from peftkit.utils.registry import METHODS

ALL_LINEAR = "all-linear"  # peft's keyword: every Linear/Conv1D of the model except the output layer


def default_targets(model) -> list[str]:
    """Every attention and FFN projection of the model's blocks, as paths inside a block (peft matches a module whose
    name ends in one), read from the model's structure."""
    from peftkit.models.families import family_of

    return list(family_of(model).projections)


class LoRAOptions(MethodArgs):
    r: int = option(8, "Rank of the update B·A.", ge=1, le=65536)
    alpha: float = option(16.0, "Scaling numerator: the update is (alpha / r)·B·A.", gt=0, le=1e6)
    dropout: float = option(0.0, "Dropout on the LoRA input.", ge=0, lt=1)
    targets: Optional[Union[Literal["all-linear"], list[str]]] = option(
        None, "Module names to adapt (peft matches names ending in one); null = every attention and FFN projection of "
              "the model's blocks, read from its structure; all-linear = peft's keyword, every Linear but the output "
              "layer. The task head trains in full either way.", min_length=1)
    train_bias: StrictBool = option(False, "Also train the biases of the adapted model (peft bias='all').")


@METHODS.register("lora", help="LoRA through peft; the task head trains and is saved with the adapter.")
class LoRA(PeftBackedMethod):
    name = "lora"
    Options = LoRAOptions
    heads = frozenset({"seq_cls", "causal_lm"})
    needs = ("linear_projections",)  # for the default targets: explicit ones are honoured on any model

    def peft_config(self, model):
        from peft import LoraConfig

        options = self.options
        targets = options.targets or default_targets(model)
        heads = head_modules(model)
        # Match names ending in the target (peft's suffix matching) but never inside the head.
        return LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                          target_modules=targets, modules_to_save=heads or None,
                          bias="all" if options.train_bias else "none",
                          exclude_modules=heads or None)

