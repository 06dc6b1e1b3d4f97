"""BitFit (Ben Zaken et al., 2022): train only the bias terms of the pretrained model, plus the task head."""

from __future__ import annotations

from peftkit.methods.base import Method, mark_only_head_trainable
from peftkit.utils.registry import METHODS


@METHODS.register("bitfit", help="BitFit: only bias terms (and the task head) train.")
class BitFit(Method):
    name = "bitfit"
    can_merge = True
    families = ("bert", "roberta", "xlm-roberta", "deberta-v2", "distilbert", "qwen2", "opt", "gpt2")
    family_note = "LLaMA and Mistral layers have no bias terms: only the head would train"

    def prepare(self, model):
        mark_only_head_trainable(model)
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.requires_grad_(True)
        return model

    def merge(self, model):
        return model  # biases live in the base architecture already
