"""LoRA (Hu et al., 2021) through huggingface/peft.

The task head (classifier/score) is listed in ``modules_to_save`` so that it trains in full and
is stored with the adapter: a saved LoRA run reloads to the same logits.
"""

from __future__ import annotations

from typing import Optional

from pydantic import StrictBool

from peftkit.config import MethodArgs, option
from peftkit.methods.peft_backed import PeftBackedMethod, head_modules
from peftkit.utils.registry import METHODS

# Default targets per model family (attribute names of the projection Linears).
DEFAULT_TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


class LoRAOptions(MethodArgs):
    r: int = option(8, "Rank of the update B·A.", ge=1, le=65536)
    alpha: float = option(16.0, "Scaling numerator: the update is (alpha / r)·B·A.", gt=0, le=1e6)
    dropout: float = option(0.0, "Dropout on the LoRA input.", ge=0, lt=1)
    targets: Optional[list[str]] = option(None, "Module names to adapt; null = every attention and FFN projection of the "
                                                "family.", min_length=1)
    train_bias: StrictBool = option(False, "Also train the biases of the adapted model (peft bias='all').")


@METHODS.register("lora", help="LoRA through peft; the task head trains and is saved with the adapter.")
class LoRA(PeftBackedMethod):
    name = "lora"
    Options = LoRAOptions
    families, family_note = tuple(DEFAULT_TARGETS), "default target projections are listed for these families only"

    def peft_config(self, model):
        from peft import LoraConfig

        from peftkit.models.families import family_of

        options = self.options
        targets = options.targets or DEFAULT_TARGETS[family_of(model).name]
        heads = head_modules(model)
        # Match names ending in the target (peft's suffix matching) but never inside the head.
        return LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                          target_modules=targets, modules_to_save=heads or None,
                          bias="all" if options.train_bias else "none",
                          exclude_modules=heads or None)

