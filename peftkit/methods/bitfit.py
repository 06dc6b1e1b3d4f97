"""BitFit (Ben Zaken et al., 2022): train only the bias terms of the pretrained model, plus the task head."""

from __future__ import annotations

from peftkit.methods.base import Method, mark_only_head_trainable
from peftkit.utils.registry import METHODS


@METHODS.register("bitfit", help="BitFit: only bias terms (and the task head) train.")
class BitFit(Method):
    name = "bitfit"
    can_merge = True
    unmerged_export = "delta"
    needs = ("biases",)

    def prepare(self, model):
        mark_only_head_trainable(model)
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.requires_grad_(True)
        return model

    def export_delta(self, model):
        """The trained biases and the head, each as "replace"."""
        return {n: ("replace", {"": p.detach()}) for n, p in model.named_parameters() if p.requires_grad}

    def merge(self, model):
        return model  # biases live in the base architecture already
