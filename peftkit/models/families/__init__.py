"""Where things sit inside a model family, and what a family can do: derived from the model, not listed.

A :class:`Family` is read from a model's structure (peftkit.models.structure: its blocks, projections, norms, run
order) and completed by one optional module of this package named after ``config.model_type`` (``-`` written
``_``) for what the structure cannot tell. Such a module may define:

  DECODER_INPUTS     (build, after_norm): how a pre-norm decoder's bare model turns ids into the first block's input
                     and keyword arguments, and what follows its final norm (MEFT runs the block loop itself)
  RESIDUAL_DROPOUT   the attribute of a block holding the dropout probability of each sub-block's output (OPT)

Most families need no module: adding one is described in docs/adding-a-model.md.

transformers 5.x copies classes between families (RoBERTa's are copies of BERT's, not subclasses), so nothing here
uses isinstance on model classes. A method states what it needs (``Method.needs``, names of :data:`CAPABILITIES`);
whether a family has it is computed here, and the reason when it has not.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Family:
    name: str  # config.model_type
    kind: str  # "encoder" | "decoder" (a decoder's self-attention does not look at later tokens)
    backbone: tuple[str, ...]  # the attribute of a task model holding the bare model (its base_model_prefix)
    layers: str  # dotted path from the bare model to the ModuleList of blocks
    attention: str  # inside one block: the module holding every attention projection
    attention_output: str  # inside one block: the attention output projection
    ffn_in: str  # the FFN projection reading the stream (the up projection of a gated FFN; gate_up when fused)
    ffn_out: str  # the FFN projection writing into the stream
    ffn_gate: str | None = None  # a gated FFN's gate projection, when it is a module of its own
    attn_linears: tuple[str, ...] = field(default_factory=tuple)  # paths inside a block, in the order they run
    ffn_linears: tuple[str, ...] = field(default_factory=tuple)
    # The parts of one block, for methods that re-compose a block from its pieces (MEFT); None where the run order
    # does not show them.
    # "post" = BERT-style: x -> LN(x + drop(proj(attn(x)))) -> LN(a + drop(ffn_out(act(ffn_in(a))))).
    # "pre"  = LLaMA/OPT-style: x -> x + attn(LN(x)) -> a + ffn(LN(a)).
    norm_position: str | None = None
    attention_core: str | None = None  # the attention itself, up to (excluding, for "post") the output projection
    attention_dropout: str | None = None  # dropout after the attention output projection
    attention_norm: str | None = None  # norm of the attention sub-block
    ffn_act: str | None = None  # the FFN activation module
    ffn_dropout: str | None = None  # dropout after the last FFN projection
    ffn_norm: str | None = None  # norm of the FFN sub-block
    # pre-norm parts (decoders): the FFN as one module (None = ffn_in -> ffn_act -> ffn_out), the attribute of the
    # block holding the dropout probability applied to each sub-block's output (OPT), and the path, from the parent
    # of ``layers``, to the norm after the last block.
    ffn: str | None = None
    residual_dropout: str | None = None
    final_norm: str | None = None
    # what the structure tells beyond paths
    transposed_projections: bool = False  # GPT-2's Conv1D
    any_biases: bool = False
    mlp_biases: bool = False
    container_passes_mask: bool = False
    decoder_inputs: tuple[Callable, Callable | None] | None = None
    family_file: str | None = None  # the module of this package completing the family, if any

    # ---- capabilities ------------------------------------------------------------------------------------------
    def lacks(self, need: str) -> str | None:
        """None when the family has capability ``need``, else why not (a clause: "its layers have no biases")."""
        if need not in CAPABILITIES:
            raise KeyError(f"unknown capability {need!r}; known: {', '.join(CAPABILITIES)}")
        return CAPABILITIES[need](self)

    @property
    def projections(self) -> tuple[str, ...]:
        return (*self.attn_linears, *self.ffn_linears)


def _linear_projections(f: Family) -> str | None:
    if f.attn_linears and f.ffn_linears:
        return None
    return "no attention and FFN projections were found in its blocks"


def _nn_linear_projections(f: Family) -> str | None:
    if not f.transposed_projections:
        return None
    return "its projections are Conv1D layers (weights stored transposed), not nn.Linear"


def _biases(f: Family) -> str | None:
    return None if f.any_biases else "its layers have no bias terms: only the task head would train"


def _mlp_biases(f: Family) -> str | None:
    return None if f.mlp_biases else "its FFN projections have no bias terms"


def _recomposable_block(f: Family) -> str | None:
    if f.norm_position == "post":
        if f.kind != "encoder":
            return "it is a post-LayerNorm decoder; re-composed decoder blocks are pre-norm"
        missing = [n for n in ("attention_core", "attention_dropout", "attention_norm", "ffn_act", "ffn_dropout",
                               "ffn_norm") if getattr(f, n) is None]
        if missing:
            return (f"its blocks do not run as BERT's (attention, output projection, dropout, norm; FFN, dropout, "
                    f"norm): no {', '.join(m.replace('_', ' ') for m in missing)} found in that order")
        if not f.container_passes_mask:
            return ("its encoder builds what each block gets (masks, relative positions) itself, which a re-composed "
                    "stack does not")
        return None
    if f.norm_position == "pre":
        if f.kind != "decoder":
            return "it is a pre-norm encoder; re-composed pre-norm blocks are decoder blocks"
        if f.attention_norm is None or f.ffn_norm is None or f.final_norm is None:
            return ("its blocks are not one norm before the attention and one before the FFN (e.g. extra norms after "
                    "a sub-block)")
        if f.decoder_inputs is None:
            name = f.name.replace("-", "_")
            return (f"how its bare model builds the first block's inputs is not described (DECODER_INPUTS in "
                    f"peftkit/models/families/{name}.py, see docs/adding-a-model.md)")
        return None
    return "its norm position could not be read"


def _quantizable(f: Family) -> str | None:
    if f.kind != "decoder" or f.norm_position != "pre":
        return "it is not a pre-norm decoder, the blocks `peftkit quantize` calibrates"
    return _nn_linear_projections(f)


# capability -> why a family lacks it (None when it has it)
CAPABILITIES: dict[str, Callable[[Family], str | None]] = {
    "linear_projections": _linear_projections,
    "nn_linear_projections": _nn_linear_projections,
    "biases": _biases,
    "mlp_biases": _mlp_biases,
    "recomposable_block": _recomposable_block,
    "quantizable": _quantizable,
}


# ---- deriving a family --------------------------------------------------------------------------------------------
def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _common_parent(paths) -> str:
    parts = [p.split(".")[:-1] for p in paths]
    common = []
    for names in zip(*parts):
        if len(set(names)) != 1:
            break
        common.append(names[0])
    return ".".join(common)


def _first(order, start: int, kind: str, stop_kind: str | None = "projection") -> tuple[int, str] | None:
    """The first entry of ``kind`` after index ``start``, before the next one of ``stop_kind``."""
    for i in range(start + 1, len(order)):
        path, k = order[i]
        if k == kind:
            return i, path
        if stop_kind is not None and k == stop_kind:
            return None
    return None


def family_file(model_type: str):
    """The module of this package completing ``model_type``, or None."""
    name = model_type.replace("-", "_")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        return None


def derive_family(model_type: str, structure, base_model_prefix: str) -> Family:
    """A Family from a model's Structure (read from its bare model) and its optional family file."""
    attention = structure.of_side("attention")
    mlp = structure.of_side("mlp")
    if not attention or not mlp:
        raise ValueError(f"no attention and FFN projections were found in a {model_type} block")
    attention_output = next((p for p in reversed(attention) if not p.reads_stream), attention[-1])
    mlp_in = [p for p in mlp if p.reads_stream]
    mlp_out = next((p for p in reversed(mlp) if not p.reads_stream), mlp[-1])
    ffn_in = mlp_in[-1] if mlp_in else mlp[0]
    gate = mlp_in[0] if len(mlp_in) == 2 else None
    order = list(structure.run_order)
    index = {path: i for i, (path, _) in enumerate(order)}
    parts: dict[str, Any] = {}
    core = _common_parent(p.path for p in attention if p.reads_stream)
    if structure.norm_position == "post":
        i_out, i_ffn_in, i_ffn_out = index[attention_output.path], index[ffn_in.path], index[mlp_out.path]
        attn_drop, attn_norm = _first(order, i_out, "dropout"), _first(order, i_out, "norm")
        ffn_drop, ffn_norm = _first(order, i_ffn_out, "dropout"), _first(order, i_ffn_out, "norm")
        act = _first(order, i_ffn_in, "other")
        separate_core = core and not attention_output.path.startswith(core + ".")
        parts = dict(attention_core=core if separate_core else None, attention_dropout=attn_drop and attn_drop[1],
                     attention_norm=attn_norm and attn_norm[1], ffn_act=act and act[1] if act and act[0] < i_ffn_out
                     else None, ffn_dropout=ffn_drop and ffn_drop[1], ffn_norm=ffn_norm and ffn_norm[1])
    else:
        i_out, i_mlp = index[attention_output.path], min(index[p.path] for p in mlp)
        first_path, first_kind = order[0]
        between = [path for path, k in order[i_out + 1:i_mlp] if k == "norm"]
        after = [path for path, k in order[index[mlp_out.path] + 1:] if k == "norm"]
        ffn_parent = _common_parent(p.path for p in mlp)
        act = _first(order, index[ffn_in.path], "other")
        layers_parent = _parent(structure.layers_path)
        final = structure.final_norm_path
        if final is not None and layers_parent:
            final = final[len(layers_parent) + 1:] if final.startswith(layers_parent + ".") else None
        parts = dict(attention_core=_common_parent(p.path for p in attention) or None,
                     attention_norm=first_path if first_kind == "norm" else None,
                     ffn_norm=between[0] if len(between) == 1 and not after else None,
                     ffn=ffn_parent or None, ffn_act=None if ffn_parent or not act else act[1], final_norm=final)
    extra = family_file(model_type)
    return Family(
        name=model_type,
        kind="decoder" if structure.causal else "encoder",
        backbone=(base_model_prefix,),
        layers=structure.layers_path,
        attention=_common_parent(p.path for p in attention),
        attention_output=attention_output.path,
        ffn_in=ffn_in.path,
        ffn_out=mlp_out.path,
        ffn_gate=gate.path if gate else None,
        attn_linears=tuple(p.path for p in attention),
        ffn_linears=tuple(p.path for p in mlp),
        norm_position=structure.norm_position,
        residual_dropout=getattr(extra, "RESIDUAL_DROPOUT", None),
        transposed_projections=any(p.transposed for p in structure.projections),
        any_biases=any(p.bias for p in structure.projections),
        mlp_biases=structure.mlp_biases,
        container_passes_mask=structure.container_passes_mask,
        decoder_inputs=getattr(extra, "DECODER_INPUTS", None),
        family_file=extra.__name__ if extra is not None else None,
        **parts,
    )


_CACHE: dict[str, Family] = {}


def _as_config(config):
    """A transformers config from a config object or a config.json dict."""
    if isinstance(config, dict):
        from transformers import AutoConfig

        values = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
        return AutoConfig.for_model(config.get("model_type"), **values)
    return config


def family_of_config(config) -> Family:
    """The Family of the architecture a config (object or config.json dict) describes, read from a shrunken random
    model built from it: no weights are read. Cached per config. ValueError when it cannot be derived."""
    from peftkit.models.structure import structure_from_config

    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if not model_type:
        raise ValueError("the model's config has no model_type")
    try:
        config = _as_config(config)
    except (ValueError, KeyError) as e:
        raise ValueError(f"transformers does not know model type {model_type!r} ({e})") from None
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{model_type} is an encoder-decoder model; peftkit fine-tunes encoders and decoders")
    key = config.to_json_string(use_diff=False)
    if key not in _CACHE:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        try:
            prefix = MODEL_MAPPING[type(config)].base_model_prefix
            structure = structure_from_config(config)
        except Exception as e:  # noqa: BLE001 - whatever stops a random model of it from being built or run
            raise ValueError(f"the structure of a {model_type} model could not be read ({type(e).__name__}: {e})") from e
        _CACHE[key] = derive_family(model_type, structure, prefix)
    return _CACHE[key]


def family_of(model) -> Family:
    """The Family of a transformers model (task model or bare backbone), or of anything whose ``config`` is a
    transformers config or a config.json dict."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no config")
    return family_of_config(config)


class _TestedFamilies(Mapping):
    """model_type -> Family of the families the suite trains every method on (tests/models/test_families.py), each
    derived from transformers' default config of that type when first asked for. These are the columns of the
    support table and the model types a checkpoint directory may have."""

    def __init__(self, names: tuple[str, ...]):
        self._names = names

    def __getitem__(self, name: str) -> Family:
        if name not in self._names:
            raise KeyError(name)
        from transformers import AutoConfig

        return family_of_config(AutoConfig.for_model(name))

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._names


FAMILIES: Mapping[str, Family] = _TestedFamilies((
    "bert", "roberta", "xlm-roberta", "electra", "deberta-v2", "distilbert", "modernbert",
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "opt", "gpt2",
))


def get_path(module, dotted: str):
    for part in dotted.split("."):
        if part:
            module = getattr(module, part)
    return module


def backbone_of(model):
    """The bare encoder/decoder inside a task model (the model itself when it is already bare)."""
    prefix = getattr(model, "base_model_prefix", None) or family_of(model).backbone[0]
    inner = getattr(model, prefix, None) if prefix else None
    return inner if inner is not None and hasattr(inner, "config") else model


def layers_of(model):
    """The ModuleList of transformer blocks."""
    return get_path(backbone_of(model), family_of(model).layers)


def split_path(dotted: str) -> tuple[str, str]:
    """'encoder.layer' -> ('encoder', 'layer'); 'layers' -> ('', 'layers')."""
    parent, _, leaf = dotted.rpartition(".")
    return parent, leaf


def ffn_modules(model) -> list[tuple[str, object]]:
    """(qualified name, module) of every FFN projection (gate, in, out) of every block, in layer order."""
    fam = family_of(model)
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for layer in layers_of(model):
        for path in (fam.ffn_gate, fam.ffn_in, fam.ffn_out):
            if path is not None:
                module = get_path(layer, path)
                found.append((names[id(module)], module))
    return found
