"""Full fine-tuning: the reference every PEFT method is compared with. Every parameter trains."""

from __future__ import annotations

from peftkit.methods.base import Method


class FullFineTuning(Method):
    name = "full"
    can_merge = True

    def prepare(self, model, options):
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def save(self, model, out_dir, options):
        """A full fine-tune is saved as a plain transformers checkpoint."""
        model.save_pretrained(out_dir, safe_serialization=True)
        self.save_options(out_dir, options)

    def load(self, base_model, in_dir, options):
        return type(base_model).from_pretrained(in_dir)

    def merge(self, model):
        return model
