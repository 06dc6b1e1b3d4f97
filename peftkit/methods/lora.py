"""LoRA (Hu et al., 2021) through huggingface/peft.

The task head (classifier/score) is listed in ``modules_to_save`` so that it trains in full and
is stored with the adapter: a saved LoRA run reloads to the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from peftkit.methods.peft_backed import PeftBackedMethod, head_modules
from peftkit.utils.options import option

# Default targets per model family (attribute names of the projection Linears).
DEFAULT_TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


@dataclass
class LoRAOptions:
    r: int = option(8, "Rank of the update B·A.")
    alpha: float = option(16.0, "Scaling numerator: the update is (alpha / r)·B·A.")
    dropout: float = option(0.0, "Dropout on the LoRA input.")
    targets: Optional[list[str]] = option(None, "Module names to adapt; None = every attention and FFN projection of the family.")
    train_bias: bool = option(False, "Also train the biases of the adapted model (peft bias='all').")

    def validate(self) -> list[str]:
        errors = []
        if self.r < 1:
            errors.append(f"r: must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            errors.append(f"dropout: must be in [0, 1), got {self.dropout}")
        return errors


class LoRA(PeftBackedMethod):
    name = "lora"
    Options = LoRAOptions

    def peft_config(self, model, options: LoRAOptions):
        from peft import LoraConfig

        from peftkit.models.families import family_of

        targets = options.targets or DEFAULT_TARGETS[family_of(model).name]
        heads = head_modules(model)
        # Match names ending in the target (peft's suffix matching) but never inside the head.
        return LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                          target_modules=targets, modules_to_save=heads or None,
                          bias="all" if options.train_bias else "none",
                          exclude_modules=heads or None)

