"""LoRA (Hu et al., 2021) through huggingface/peft.

The task head (classifier/score) is listed in ``modules_to_save`` so that it trains in full and
is stored with the adapter: a saved LoRA run reloads to the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from peftkit.methods.base import Method
from peftkit.utils.options import option

# Default targets per model family (attribute names of the projection Linears).
DEFAULT_TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
HEAD_MODULES = ("classifier", "score")


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


class LoRA(Method):
    name = "lora"
    Options = LoRAOptions
    can_merge = True

    def peft_config(self, model, options: LoRAOptions):
        from peft import LoraConfig

        from peftkit.models.families import family_of

        targets = options.targets or DEFAULT_TARGETS[family_of(model).name]
        heads = [h for h in HEAD_MODULES if hasattr(model, h)]
        # Match names ending in the target (peft's suffix matching) but never inside the head.
        return LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                          target_modules=targets, modules_to_save=heads or None,
                          bias="all" if options.train_bias else "none",
                          exclude_modules=heads or None)

    def prepare(self, model, options: LoRAOptions):
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
