"""The contract every method plugin fulfils.

A method is one module under ``peftkit/methods/``: an options section (a ``MethodArgs`` subclass whose
fields carry defaults, ranges and help) and a :class:`Method` subclass registered beside it with
``@METHODS.register("name")``. A method object is created with its options, validated then
(``create_method``); everything after that reads ``self.options``. The trainer only talks to it through:

* ``prepare(model)``               apply the method; afterwards only the method's parameters
                                    (and the task head, when it has one) require grad.
* ``param_groups(model, wd)``       optimizer parameter groups (default: AdamW groups with no
                                    weight decay on biases and LayerNorm weights).
* ``compute_loss(model, batch)``    the loss of one batch (default: ``model(**batch).loss``).
* ``after_optimizer_step(model)``   a hook after every optimizer step (default: nothing).
* ``training_note(model, step)``    at every logged step: a warning line for train.log, or None (default).
* ``trainable_state(model)``        the tensors that define the fine-tuned model beyond the base:
                                    what checkpoints and ``save`` store (default: params that require grad).
* ``save(model, dir)`` / ``load(base, dir)``  the method's compact format (safetensors); the options are
                                    recorded once, in the run's ``final/peftkit.json``.
* ``check_saved(dir, what, remedy)``  the files ``load`` reads, checked before it opens any (present, not a
                                    pickle, not truncated, finite; default: adapter.safetensors).
* ``merge(model)``                  a plain transformers model, where the method allows it.
* ``heads`` / ``needs``             the task heads it runs on, and what it needs of a model family (capabilities
                                    in peftkit/models/families: ``linear_projections``, ``biases``, ...); which
                                    family it supports is computed from these, never listed.
* ``unmerged_export`` / ``export_delta(model)``  what ``peftkit export --no-merge`` writes: "peftkit" (the run's
                                    own format, the default), "transformers", "peft", or "delta" (the compact
                                    format of peftkit/artifacts/delta.py, which ``export_delta`` returns).

Defaults cover the common case, so a method overrides only what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from peftkit.config import MethodArgs

ADAPTER_FILE = "adapter.safetensors"
NO_DECAY_MARKERS = ("bias", "LayerNorm.weight", "layer_norm.weight", "layernorm.weight", "norm.weight")


class Method:
    """Base class for method plugins; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[MethodArgs]] = MethodArgs
    can_merge: ClassVar[bool] = False
    # train.strategy=fsdp (FSDP2, peftkit/train/distributed.py shard_model): parameters become DTensors between
    # uses and are gathered by hooks around each unit's forward and backward; every method is checked under it
    # (tests/train/test_fsdp_methods.py). fsdp_blocks: shard each transformer block as a unit of its own (gathered
    # around its own forward and backward); False: the whole model is one unit, for methods whose forward calls
    # pieces of a block rather than the block.
    fsdp_blocks: ClassVar[bool] = True
    # Why train.compile runs this method eagerly (one log line), or None: torch.compile is tried, eager where it fails.
    compile_refusal: ClassVar[str | None] = None
    unmerged_export: ClassVar[str] = "peftkit"
    # The task heads (model.task_head) the method is built and tested for.
    heads: ClassVar[frozenset[str]] = frozenset({"seq_cls"})
    # What the method needs of a model family: names of peftkit.models.families.CAPABILITIES, each computed from the
    # model's structure. A model whose family lacks one is refused before training, with the reason; the support
    # table (`peftkit methods`, docs/methods/support.md) is computed from the same declarations.
    needs: ClassVar[tuple[str, ...]] = ()
    # What an option value adds to ``needs``: (option, value) -> capabilities (HiWi's bias target needs FFN biases).
    option_needs: ClassVar[dict[tuple[str, Any], tuple[str, ...]]] = {}
    # train.gradient_checkpointing: null takes this. On for quantized bases, where the weights are small and the
    # activations are most of a step's memory (peft's prepare_model_for_kbit_training makes the same choice).
    checkpoints_by_default: ClassVar[bool] = False

    def __init__(self, options: MethodArgs | None = None):
        if options is not None and not isinstance(options, self.Options):
            raise TypeError(f"method {self.name!r} takes {self.Options.__name__}, got {type(options).__name__}")
        self.options = options if options is not None else self.Options()

    def fsdp_units(self, model) -> list:
        """Modules FSDP shards as units of their own, inside the blocks and without a mixed-precision cast (e.g.
        packed quantized weights); called after ``prepare``, before sharding. Default: none."""
        return []

    # ---- applying the method -------------------------------------------------------------
    def needed(self) -> tuple[str, ...]:
        """What this method, with its options, needs of a family: ``needs`` and the ``option_needs`` of the options
        set (a method whose options can make a need go away, e.g. explicit target modules, says so here)."""
        extra = [need for (option, value), needs in self.option_needs.items()
                 if getattr(self.options, option, None) == value for need in needs]
        return tuple(dict.fromkeys((*self.needs, *extra)))

    @classmethod
    def unsupported(cls, family, needs: tuple[str, ...] | None = None) -> str | None:
        """None when ``family`` has every capability in ``needs`` (default: the class's), else why not."""
        for need in cls.needs if needs is None else needs:
            why = family.lacks(need)
            if why:
                return why
        return None

    def check_family(self, model) -> None:
        """A UserError when ``model``'s family lacks something this method needs, naming what. ``model`` may be
        anything whose ``config`` is a transformers config or a config.json dict (read before weights load)."""
        from peftkit.errors import UserError
        from peftkit.models.families import family_of

        needs = self.needed()
        if not needs:
            return
        try:
            family = family_of(model)
        except ValueError as e:
            raise UserError(f"method {self.name} cannot tell what this model is made of: {e}. Use a model of a "
                            f"family `peftkit methods` lists, or method full.") from None
        why = self.unsupported(family, needs)
        if why:
            raise UserError(f"method {self.name} does not support {family.name} models: {why}. Choose another "
                            f"method (`peftkit methods` prints which method supports which family) or a model of "
                            f"another family.")

    def prepare(self, model):  # pragma: no cover - every method defines it
        raise TypeError(f"method {self.name!r} does not define prepare()")

    def param_groups(self, model, weight_decay: float) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if any(m in name for m in NO_DECAY_MARKERS) or param.ndim < 2 else decay).append(param)
        groups = []
        if decay:
            groups.append({"params": decay, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def compute_loss(self, model, batch):
        """The training loss of one batch (default: the model's own loss from labels in the batch)."""
        return model(**batch).loss

    def after_optimizer_step(self, model) -> None:
        """Called after every optimizer step (e.g. to re-apply a sparse update)."""

    def training_note(self, model, step: int) -> str | None:
        """Called at every logged step (train.log_every): a warning about the method's own state for the run's log
        (e.g. parts of it that stopped learning), or None. Raises RunFailed when the method can no longer learn."""
        return None

    # ---- state -----------------------------------------------------------------------------
    def trainable_state(self, model) -> dict[str, Any]:
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model, state: dict[str, Any]) -> None:
        import torch

        params = dict(model.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise ValueError(f"state has tensors the model lacks: {missing[:5]}")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def save(self, model, out_dir: Path) -> None:
        """Store ``trainable_state`` as safetensors."""
        from safetensors.torch import save_file

        state = {k: v.contiguous().cpu() for k, v in self.trainable_state(model).items()}
        save_file(state, str(Path(out_dir) / ADAPTER_FILE))

    def check_saved(self, in_dir: Path, what: str, remedy: str) -> None:
        """Check the files ``load`` reads from ``in_dir`` before it opens any: a UserError starting with ``what`` and
        ending with ``remedy`` for a missing, pickled, truncated or non-finite one."""
        from peftkit.models.load import check_weights_file

        check_weights_file(Path(in_dir) / ADAPTER_FILE, what, remedy)

    def load(self, base_model, in_dir: Path):
        """Apply the method to a freshly loaded base model and restore its saved state."""
        from safetensors.torch import load_file

        model = self.prepare(base_model)
        self.load_trainable_state(model, load_file(str(Path(in_dir) / ADAPTER_FILE)))
        return model

    def merge(self, model):
        """Return a plain transformers model with the method folded in (only if ``can_merge``)."""
        raise TypeError(f"method {self.name!r} cannot be merged into the base architecture")

    def enable_gradient_checkpointing(self, model) -> None:
        """Recompute each layer in backward (transformers' own checkpointing, non-reentrant so frozen inputs work)."""
        from peftkit.errors import UserError

        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not getattr(inner, "supports_gradient_checkpointing", False):
            raise UserError(f"train.gradient_checkpointing: {type(inner).__name__} does not support it; "
                            f"set train.gradient_checkpointing=false.")
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def export_delta(self, model) -> dict:
        """NAME -> (op, {suffix: tensor}) of a loaded run (see peftkit/artifacts/delta.py), for ``unmerged_export = "delta"``."""
        raise TypeError(f"method {self.name!r} has no compact delta format")

    def load_base(self, model_args, task_head: str, num_labels: int | None, problem_type: str | None):
        """Return a base model when this method needs a special one (e.g. a quantized base); None = the usual loader."""
        return None


HEAD_PREFIXES = ("classifier.", "pre_classifier.", "score.", "qa_outputs.")


def is_head_parameter(name: str) -> bool:
    """True for the task head: classifier/score (and DistilBERT's pre_classifier, created with the head), and BERT's
    pooler, which only the classification head uses.

    BERT's pooler counts as head because RoBERTa's classification head has the same dense+tanh layer
    inside its classifier, and because sentence-embedding checkpoints (all-MiniLM-L6-v2) ship an
    untrained pooler (std 0.009, zero bias): frozen, it blocks learning on pair tasks such as MRPC.
    """
    return name.startswith(HEAD_PREFIXES) or ".classifier." in name or ".pooler." in name or name.startswith("pooler.")


def mark_only_head_trainable(model) -> list[str]:
    """Freeze everything except the task head (classifier / score / BERT pooler); return the head names."""
    head_names = []
    for name, param in model.named_parameters():
        is_head = is_head_parameter(name)
        param.requires_grad_(is_head)
        if is_head:
            head_names.append(name)
    return head_names


def parametrizations_of(model, kind: type) -> dict:
    """'<module>.<tensor>' -> the parametrization of type ``kind`` registered on it (torch.nn.utils.parametrize)."""
    from torch.nn.utils import parametrize

    found = {}
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr, chain in module.parametrizations.items():
                for p in chain:
                    if isinstance(p, kind):
                        found[f"{module_name}.{attr}"] = p
    return found
