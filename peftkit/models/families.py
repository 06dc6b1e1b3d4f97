"""Where things sit inside each model family, located by attribute names.

transformers 5.x copies classes between families (RoBERTa's are copies of BERT's, not
subclasses), so nothing here uses isinstance on model classes: a family is recognised by
``config.model_type`` and its sub-modules are reached by attribute paths.

For each family we record:
  backbone  attribute of the task model that holds the bare encoder/decoder
  layers    path (from the backbone) to the ModuleList of transformer blocks
  attention / ffn   inside one block: the attention sub-block and the feed-forward parts
  linear names      the projection Linear modules (for LoRA/quantization targets)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "encoder" | "decoder"
    backbone: tuple[str, ...]  # candidate attribute names on a task model for the bare model
    layers: str  # dotted path from the bare model to the ModuleList of blocks
    attention: str  # dotted path inside a block to the attention sub-block
    attention_output: str  # dotted path inside a block to the attention output projection
    ffn_in: str  # dotted path inside a block to the first FFN Linear (d -> d_ff)
    ffn_out: str  # dotted path inside a block to the last FFN Linear (d_ff -> d)
    ffn_gate: str | None = None  # gated FFNs (LLaMA)
    attn_linears: tuple[str, ...] = field(default_factory=tuple)  # q, k, v, o leaf names
    ffn_linears: tuple[str, ...] = field(default_factory=tuple)
    # The parts of one block, for methods that re-compose a block from its pieces (MEFT).
    # "post" = BERT-style: x -> LN(x + drop(proj(attn(x)))) -> LN(a + drop(ffn_out(act(ffn_in(a))))).
    # "pre"  = LLaMA/OPT-style: x -> x + attn(LN(x)) -> a + ffn(LN(a)). None = not described yet.
    norm_position: str | None = None
    attention_core: str | None = None  # the attention itself, up to (excluding, for "post") the output projection
    attention_dropout: str | None = None  # dropout after the attention output projection
    attention_norm: str | None = None  # LayerNorm of the attention sub-block
    ffn_act: str | None = None  # the FFN activation module
    ffn_dropout: str | None = None  # dropout after the last FFN Linear
    ffn_norm: str | None = None  # LayerNorm of the FFN sub-block
    # pre-norm parts (decoders): the FFN as one module (LLaMA's gated mlp; None = ffn_in -> ffn_act -> ffn_out), the
    # attribute of the block holding the dropout probability applied to each sub-block's output (OPT), and the
    # path, from the parent of ``layers``, to the norm after the last block.
    ffn: str | None = None
    residual_dropout: str | None = None
    final_norm: str | None = None


_BERT = Family(
    name="bert",
    kind="encoder",
    backbone=("bert", "roberta"),
    layers="encoder.layer",
    attention="attention",
    attention_output="attention.output.dense",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    attn_linears=("query", "key", "value", "attention.output.dense"),
    ffn_linears=("intermediate.dense", "output.dense"),
    norm_position="post",
    attention_core="attention.self",
    attention_dropout="attention.output.dropout",
    attention_norm="attention.output.LayerNorm",
    ffn_act="intermediate.intermediate_act_fn",
    ffn_dropout="output.dropout",
    ffn_norm="output.LayerNorm",
)

_LLAMA = Family(
    name="llama",
    kind="decoder",
    backbone=("model",),
    layers="layers",
    attention="self_attn",
    attention_output="self_attn.o_proj",
    ffn_in="mlp.up_proj",
    ffn_out="mlp.down_proj",
    ffn_gate="mlp.gate_proj",
    attn_linears=("q_proj", "k_proj", "v_proj", "o_proj"),
    ffn_linears=("gate_proj", "up_proj", "down_proj"),
    norm_position="pre",
    attention_core="self_attn",
    attention_norm="input_layernorm",
    ffn_norm="post_attention_layernorm",
    ffn="mlp",
    final_norm="norm",
)

FAMILIES: dict[str, Family] = {
    # encoders
    "bert": _BERT,
    "roberta": Family(**{**_BERT.__dict__, "name": "roberta", "backbone": ("roberta", "bert")}),
    "xlm-roberta": Family(**{**_BERT.__dict__, "name": "xlm-roberta", "backbone": ("roberta",)}),
    # DeBERTa-v2/v3: BERT's block layout; the attention (disentangled, relative positions) has its own projections.
    "deberta-v2": Family(**{**_BERT.__dict__, "name": "deberta-v2", "backbone": ("deberta",),
                            "attn_linears": ("query_proj", "key_proj", "value_proj", "attention.output.dense")}),
    # DistilBERT: post-norm too, but the attention block holds its output projection and the norms sit on the layer.
    "distilbert": Family(
        name="distilbert",
        kind="encoder",
        backbone=("distilbert",),
        layers="transformer.layer",
        attention="attention",
        attention_output="attention.out_lin",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        attn_linears=("q_lin", "k_lin", "v_lin", "out_lin"),
        ffn_linears=("lin1", "lin2"),
    ),
    # decoders
    "llama": _LLAMA,
    "mistral": Family(**{**_LLAMA.__dict__, "name": "mistral"}),
    "qwen2": Family(**{**_LLAMA.__dict__, "name": "qwen2"}),  # q/k/v carry biases
    "opt": Family(
        name="opt",
        kind="decoder",
        backbone=("model",),
        layers="decoder.layers",
        attention="self_attn",
        attention_output="self_attn.out_proj",
        ffn_in="fc1",
        ffn_out="fc2",
        attn_linears=("q_proj", "k_proj", "v_proj", "out_proj"),
        ffn_linears=("fc1", "fc2"),
        norm_position="pre",  # config.do_layer_norm_before; OPT-350m is post-norm (MEFT checks the config)
        attention_core="self_attn",
        attention_norm="self_attn_layer_norm",
        ffn_act="activation_fn",
        ffn_norm="final_layer_norm",
        residual_dropout="dropout",
        final_norm="final_layer_norm",
    ),
    "gpt2": Family(
        name="gpt2",
        kind="decoder",
        backbone=("transformer",),
        layers="h",
        attention="attn",
        attention_output="attn.c_proj",
        ffn_in="mlp.c_fc",
        ffn_out="mlp.c_proj",
        attn_linears=("c_attn", "attn.c_proj"),
        ffn_linears=("c_fc", "mlp.c_proj"),
    ),
}
ENCODERS = tuple(name for name, fam in FAMILIES.items() if fam.kind == "encoder")
DECODERS = tuple(name for name, fam in FAMILIES.items() if fam.kind == "decoder")


def family_of(model) -> Family:
    """The Family of a transformers model (task model or bare backbone)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        known = ", ".join(FAMILIES)
        raise ValueError(f"model type {model_type!r} is not described in peftkit.models.families (known: {known})")
    return FAMILIES[model_type]


def get_path(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def backbone_of(model):
    """The bare encoder/decoder inside a task model (the model itself when it is already bare)."""
    fam = family_of(model)
    for attr in fam.backbone:
        if hasattr(model, attr):
            inner = getattr(model, attr)
            if hasattr(inner, "config"):
                return inner
    return model


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
