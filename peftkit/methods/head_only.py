"""Head only: the pretrained model stays frozen and only the task head trains (linear probing, plus BERT's pooler).

The control every parameter-efficient method has to beat: a method whose adapted parameters barely move (HiWi on
near-zero biases, a PaFi mask of tiny entries) can score well only because its head trains. What trains is exactly
what ``mark_only_head_trainable`` marks for every other method (classifier / score, and BERT's pooler), so the
comparison isolates what the method adds beyond the head.
"""

from __future__ import annotations

from peftkit.errors import UserError
from peftkit.methods.base import Method, mark_only_head_trainable
from peftkit.utils.registry import METHODS


@METHODS.register("head-only", help="Head only: the model is frozen and only the task head trains (the control).")
class HeadOnly(Method):
    name = "head-only"
    can_merge = True  # the head is part of the base architecture
    unmerged_export = "delta"

    def prepare(self, model):
        if not mark_only_head_trainable(model):
            raise UserError(f"method head-only: {type(model).__name__} has no task head (classifier, score or pooler) "
                            f"to train, so nothing would train. Use it with a classification or regression task "
                            f"(a GLUE task or data.task_type classification), or choose another method.")
        return model

    def export_delta(self, model):
        """The trained head, each tensor as "replace"."""
        return {n: ("replace", {"": p.detach()}) for n, p in model.named_parameters() if p.requires_grad}

    def merge(self, model):
        return model
