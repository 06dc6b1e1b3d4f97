"""Full fine-tuning: the reference every PEFT method is compared with. Every parameter trains."""

from __future__ import annotations

from peftkit.methods.base import Method
from peftkit.utils.registry import METHODS


@METHODS.register("full", help="Full fine-tuning: every parameter trains.")
class FullFineTuning(Method):
    name = "full"
    can_merge = True
    unmerged_export = "transformers"  # the result is the whole model either way
    heads = frozenset({"seq_cls", "causal_lm"})

    def prepare(self, model):
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def save(self, model, out_dir):
        """A full fine-tune is saved as a plain transformers checkpoint."""
        model.save_pretrained(out_dir, safe_serialization=True)

    def check_saved(self, in_dir, what, remedy):
        from peftkit.models.load import check_model_dir

        check_model_dir(in_dir)

    def load(self, base_model, in_dir):
        return type(base_model).from_pretrained(in_dir)

    def merge(self, model):
        return model
