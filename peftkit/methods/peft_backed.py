"""What every method built on huggingface/peft shares: state, save/load in peft's adapter format, merge.

A subclass defines ``peft_config(model)`` (or overrides ``prepare``). The task head —
the classifier/score and BERT's pooler, see base.is_head_parameter — is listed in peft's
``modules_to_save`` so it trains in full and is stored with the adapter.
"""

from __future__ import annotations

from peftkit.methods.base import Method

HEAD_MODULES = ("classifier", "pre_classifier", "score")


def head_modules(model) -> list[str]:
    """Names of the task-head modules present on ``model``, for peft's ``modules_to_save``.

    BERT's pooler and RoBERTa's classifier are named by their Linears ("pooler.dense", "classifier.out_proj"):
    peft's merges copy ``.weight`` from each saved module, which those containers do not have.
    """
    from peftkit.models.families import backbone_of

    heads = []
    for name in HEAD_MODULES:
        module = getattr(model, name, None)
        if module is None:
            continue
        if getattr(module, "weight", None) is not None:
            heads.append(name)
        else:  # a container (RoBERTa's dense + out_proj head): peft's merges copy ``.weight``, so name its Linears
            heads += [f"{name}.{n}" for n, m in module.named_modules() if n and getattr(m, "weight", None) is not None]
    # the pooler sits in the bare model (BERT) or beside it on the task model (DeBERTa's ContextPooler)
    if any(getattr(getattr(owner, "pooler", None), "dense", None) is not None for owner in (backbone_of(model), model)):
        heads.append("pooler.dense")
    return heads


class PeftBackedMethod(Method):
    can_merge = True
    unmerged_export = "peft"

    def needed(self):
        """Explicit ``method.targets`` are honoured on any model (peft says when one matches nothing)."""
        return () if getattr(self.options, "targets", None) else super().needed()

    def peft_config(self, model):  # pragma: no cover - every subclass defines it or overrides prepare
        raise TypeError(f"method {self.name!r} defines neither peft_config() nor prepare()")

    def prepare(self, model):
        from peft import get_peft_model

        from peftkit.errors import UserError

        try:
            return get_peft_model(model, self.peft_config(model))
        except (ValueError, TypeError) as e:  # peft's words for targets that match no module, or one it cannot adapt
            raise UserError(f"method {self.name}: peft cannot apply it to this {model.config.model_type} model: {e} "
                            f"Set method.targets to module names of this model (or leave it null for the defaults).") from None

    def trainable_state(self, model):
        from peft import get_peft_model_state_dict

        state, seen = {}, set()
        for key, value in get_peft_model_state_dict(model).items():
            # With bias="all", peft lists a head bias under its own name and under modules_to_save, one storage:
            # safetensors refuses shared storage, so the second name gets its own copy.
            local = value.to_local() if hasattr(value, "to_local") else value  # under FSDP: this process's shard
            pointer = local.untyped_storage().data_ptr()
            state[key] = value.detach().clone() if pointer in seen else value.detach()
            seen.add(pointer)
        return state

    def load_trainable_state(self, model, state):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter state has unexpected keys: {result.unexpected_keys[:5]}")

    def save(self, model, out_dir):
        model.save_pretrained(out_dir, safe_serialization=True)

    def check_saved(self, in_dir, what, remedy):
        from peftkit.models.load import check_adapter_dir

        check_adapter_dir(in_dir, what, remedy)

    def load(self, base_model, in_dir):
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, in_dir, is_trainable=False)

    def merge(self, model):
        return model.merge_and_unload()
