"""MEFT (reversible): memory-efficient fine-tuning by making a pretrained model reversible (arXiv 2306.00477).

Not to be confused with the unrelated 2024 paper also called "MEFT".

The embedding h0 is duplicated into two streams (x1, x2) = (h0, h0) and every layer becomes a reversible
block  y1 = lam·x1 + F(x2),  y2 = beta·x2 + G(y1)  (see peftkit/models/reversible.py). The three variants
choose F and G so that, with small adapters, the stream feeding each pretrained sub-block is the pretrained
hidden state plus only a 0.1-scaled extra residual: the pretrained starting point is (almost) preserved.

    variant  F                                    G                                    lam  beta  swap
    meft1    pretrained layer (+ parallel FFN ad.) new adapter                          0.1  1     yes
    meft2    new adapter                           pretrained layer (+ parallel FFN ad.) 1    0.1   yes
    meft3    attention block (+ adapter after the  FFN block (+ parallel FFN adapter)    0.1  0.1   no
             output projection, before the LN)

The final feature is the average of the two streams, (x1 + x2) / 2, fed to the pooler / task head.
Only adapters and the task head (classifier + BERT pooler, see base.is_head_parameter) train; embeddings and LayerNorms stay frozen.

Numerics: with floating-point streams, reconstruction divides rounding by lam·beta per layer, so in fp32 the
lowest layers of a deep fully reversible stack get wrong gradients (a 12-layer BERT: relative error ~1 at the
bottom; the authors' code behaves the same). The default ``stream_arithmetic: fixed`` holds the streams in exact
64-bit fixed point and keeps the remainders that scaling by lam/beta drops (peftkit/models/reversible.py), so the
reconstruction is bit-exact and the gradients are plain autograd's at any depth, for two 8-byte streams plus a few
bits per element and layer. ``stream_arithmetic: float`` is the paper's arithmetic; with it,
``segment_layers`` = k runs the stack as segments of k layers that keep the streams at their boundaries and
reconstruct only inside (2 tensors per segment; k = 2 keeps fp32 errors below 1e-4, see the option's help).

Placement: the family's layer container (BERT/RoBERTa ``encoder``) is replaced by a :class:`MEFTEncoder`
that keeps the pretrained layers under the same attribute name (parameter names are unchanged) and adds
the adapters. The HF model's own forward, loss and outputs are untouched, so ``model(**batch).loss`` works.
Blocks are re-composed from their pieces by the paths peftkit/models/families reads from the model's run order
(capability ``recomposable_block``); a post-norm encoder whose container hands its blocks the mask unchanged is
supported. Pre-norm decoders with a decoder-input builder in their family file (LLaMA, Mistral, Qwen2/3, OPT) run
their layer loop inside the bare model's forward together with the mask, positions and the final norm, so
:class:`MEFTDecoder` replaces that container: :class:`PreNormLayerParts` gives the same sub-block interface
(each sub-block keeps its residual), and the causal-LM head reads ``final_norm(x_p + merge_weight·x_o)``
from the stream x_p holding the last pretrained sub-block's output (docs/methods/meft.md, "Decoders").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from pydantic import model_validator
from torch import nn

from peftkit.config import MethodArgs, option
from peftkit.errors import UserError
from peftkit.methods.base import Method, mark_only_head_trainable
from peftkit.models.families import Family, backbone_of, family_of, get_path, split_path
from peftkit.models.reversible import ReversibleBlock, exact_ratio, run_stack
from peftkit.utils.registry import METHODS


class MEFTOptions(MethodArgs):
    r: int = option(8, "Adapter bottleneck width (Linear d->r, activation, Linear r->d).", ge=1, le=65536)
    lambda_factor: Optional[float] = option(None, "lambda in y1 = lambda·x1 + F(x2); null = the variant's value "
                                                  "(0.1 / 1 / 0.1). The inverse divides by it.", gt=0, le=1e3)
    beta_factor: Optional[float] = option(None, "beta in y2 = beta·x2 + G(y1); null = the variant's value (1 / 0.1 / 0.1).",
                                          gt=0, le=1e3)
    num_rev_layers: Optional[int] = option(
        None, "How many layers (from the bottom) run reversibly; the layers above use ordinary autograd. null = all.",
        ge=0, le=100_000)
    segment_layers: Optional[int] = option(
        None, "Run the reversible layers as segments of this many layers: the streams between segments are kept for "
              "backward and reconstruction stays inside a segment, so fp32 rounding is amplified over at most this many "
              "layers. 2 keeps each layer's relative gradient error below 1e-4 (measured on 12 layers: up to 6e-6 for "
              "MEFT3 on an Intel Xeon, 4.5e-5 on an AMD Zen 4, under 1e-6 for MEFT1/2; 3 layers: up to 4e-4 for MEFT3). "
              "null = one segment, as in the paper.", ge=1, le=100_000)
    stream_arithmetic: Literal["fixed", "float"] = option(
        "fixed", "How the reversible layers hold their two streams. fixed: exact 64-bit fixed point that keeps the bits "
                 "scaling by lambda/beta drops, so backward reconstructs every layer's input bit for bit and gradients "
                 "equal plain autograd's at any depth (lambda and beta must be fractions with denominators <= 1000). "
                 "float: the paper's floating-point streams, whose reconstruction amplifies rounding by 1/(lambda·beta) "
                 "per layer (see segment_layers).")
    init_std: float = option(0.02, "Std of the normal init of the adapter weights (biases start at zero).", ge=0, le=10)

    @model_validator(mode="after")
    def _factors_are_exact_fractions(self):
        if self.stream_arithmetic == "fixed":
            for name in ("lambda_factor", "beta_factor"):
                if getattr(self, name) is not None:
                    try:
                        exact_ratio(getattr(self, name))
                    except ValueError as e:
                        raise ValueError(f"{name}: {e}. Round it, or set stream_arithmetic: float") from None
        return self


class Adapter(nn.Module):
    """Linear(d->r) -> the model's activation -> Linear(r->d), weights ~ N(0, std²), biases 0."""

    def __init__(self, hidden: int, r: int, activation: nn.Module, std: float):
        super().__init__()
        self.down = nn.Linear(hidden, r)
        self.act = activation
        self.up = nn.Linear(r, hidden)
        for linear in (self.down, self.up):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    def forward(self, x):
        return self.up(self.act(self.down(x)))


# ---- dropout inside the reversible blocks ----------------------------------------------------------------
# torch's CPU dropout draws every mask element with bernoulli_, about a fifth of a training step of a BERT layer,
# and a reversible block draws each mask twice (forward, then the recomputation in backward). On the CPU the
# blocks draw masks from 64-bit words instead: 4 16-bit lanes per word, an element is dropped when its lane is
# below round(p * 2^16), so the drop probability is p to within 2^-17 and kept elements are scaled by the exact
# inverse of their keep probability (the mean is unchanged). Each mask costs one draw of a 63-bit seed from
# torch's default CPU generator, so the reversible backward's RNG replay (models/reversible.py) regenerates
# exactly the forward's masks, at a quarter of bernoulli_'s cost and with no per-layer memory.
_LANES = 1 << 16


def _drops_on_cpu(x: torch.Tensor, p: float, training: bool) -> bool:
    """Whether this dropout is drawn by ``_keep_mask`` (CPU tensors in training with p > 0)."""
    return training and p > 0 and x.device.type == "cpu"


def _keep_mask(shape, p: float) -> tuple[torch.Tensor, float]:
    """(bool mask of the elements kept, 1 / keep probability); the seed comes from torch's default CPU generator."""
    threshold = min(max(round(p * _LANES), 1), _LANES - 1)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    numel = 1
    for size in shape:
        numel *= size
    words = torch.empty((numel + 3) // 4, dtype=torch.int64)
    words.random_(-(1 << 63), None, generator=torch.Generator().manual_seed(seed))
    lanes = words.view(torch.int16)[:numel].view(shape)
    return lanes >= threshold - (_LANES // 2), _LANES / (_LANES - threshold)


def _dropout(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``module`` (an nn.Dropout) applied to x, with its mask from ``_keep_mask`` on the CPU."""
    p = float(getattr(module, "p", 0.0))
    if not _drops_on_cpu(x, p, module.training):
        return module(x)
    keep, scale = _keep_mask(x.shape, p)
    return torch.where(keep, x, 0.0).mul_(scale)


def _dropout_add(x: torch.Tensor, module: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """residual + module(x) in as few passes as the dropout allows."""
    p = float(getattr(module, "p", 0.0))
    if not _drops_on_cpu(x, p, module.training):
        return module(x) + residual
    keep, scale = _keep_mask(x.shape, p)
    return torch.add(residual, torch.where(keep, x, 0.0), alpha=scale)


class PostNormLayerParts:
    """The two sub-blocks of a post-LayerNorm (BERT-style) layer, found by the family's attribute paths.

    In eval mode (and off the CPU) every piece runs as the pretrained modules do. In training on the CPU the
    dropouts draw their masks with ``_keep_mask`` and the self-attention is written out here (the modules' own
    query/key/value Linears, scaled dot product, the additive or boolean mask, softmax, dropout of the
    probabilities), because the attention kernels draw their dropout internally."""

    def __init__(self, layer: nn.Module, family: Family):
        self.attention_core = get_path(layer, family.attention_core)
        self.attention_proj = get_path(layer, family.attention_output)
        self.attention_dropout = get_path(layer, family.attention_dropout)
        self.attention_norm = get_path(layer, family.attention_norm)
        self.ffn_in = get_path(layer, family.ffn_in)
        self.ffn_act = get_path(layer, family.ffn_act)
        self.ffn_out = get_path(layer, family.ffn_out)
        self.ffn_dropout = get_path(layer, family.ffn_dropout)
        self.ffn_norm = get_path(layer, family.ffn_norm)

    def self_attention(self, x, attention_mask=None, **kwargs):
        """The attention core's output (before the output projection)."""
        core = self.attention_core
        probs_dropout = getattr(core, "dropout", None)
        p = float(getattr(probs_dropout, "p", 0.0))
        if not (_drops_on_cpu(x, p, core.training) and hasattr(core, "query") and hasattr(core, "attention_head_size")):
            return core(x, attention_mask=attention_mask, **kwargs)[0]
        batch, length = x.shape[:2]
        shape = (batch, length, -1, core.attention_head_size)
        scaling = getattr(core, "scaling", core.attention_head_size ** -0.5)
        query = (core.query(x) * scaling).view(shape).transpose(1, 2)
        key = core.key(x).view(shape).transpose(1, 2)
        value = core.value(x).view(shape).transpose(1, 2)
        scores = torch.matmul(query, key.transpose(-1, -2))
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:  # True = attend
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            else:  # additive: 0 or a large negative number
                scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1)
        keep, scale = _keep_mask(probs.shape, p)
        mixed = torch.matmul(torch.where(keep, probs, 0.0), value).mul_(scale)
        return mixed.transpose(1, 2).reshape(batch, length, -1)

    def attention(self, x, adapter: Adapter | None = None, attention_mask=None, **kwargs):
        """LN(x + drop(proj(attn(x)))); a sequential adapter acts on the projection output before the LN."""
        projected = self.attention_proj(self.self_attention(x, attention_mask=attention_mask, **kwargs))
        if adapter is None:
            return self.attention_norm(_dropout_add(projected, self.attention_dropout, x))
        out = _dropout(projected, self.attention_dropout)
        return self.attention_norm(out + adapter(out) + x)

    def ffn(self, a, adapter: Adapter | None = None):
        """LN(a + drop(ffn_out(act(ffn_in(a))))); a parallel adapter reads the FFN input a."""
        out = self.ffn_out(self.ffn_act(self.ffn_in(a)))
        if adapter is None:
            return self.ffn_norm(_dropout_add(out, self.ffn_dropout, a))
        return self.ffn_norm(_dropout(out, self.ffn_dropout) + adapter(a) + a)

    def layer(self, x, ffn_adapter: Adapter | None = None, **kwargs):
        return self.ffn(self.attention(x, **kwargs), ffn_adapter)


# How each variant builds F and G of one layer from its parts and its adapters.
BlockBuilder = Callable[[nn.Module, PostNormLayerParts, nn.ModuleDict], tuple]


def _meft1_block(layer, parts, adapters):
    def f(x, **kwargs):
        return parts.layer(x, adapters["ffn"], **kwargs)

    def g(y, **kwargs):
        return adapters["g"](y)

    return f, g, [layer, adapters["ffn"]], [adapters["g"]]


def _meft2_block(layer, parts, adapters):
    def f(x, **kwargs):
        return adapters["f"](x)

    def g(y, **kwargs):
        return parts.layer(y, adapters["ffn"], **kwargs)

    return f, g, [adapters["f"]], [layer, adapters["ffn"]]


def _meft3_block(layer, parts, adapters):
    def f(x, **kwargs):
        return parts.attention(x, adapters["attention"], **kwargs)

    def g(y, **kwargs):
        return parts.ffn(y, adapters["ffn"])

    return f, g, [layer, adapters["attention"]], [layer, adapters["ffn"]]


@dataclass(frozen=True)
class Variant:
    lam: float
    beta: float
    swap: bool
    adapters: tuple[str, ...]  # adapter names per layer
    build: BlockBuilder


VARIANTS = {
    "meft1": Variant(0.1, 1.0, True, ("ffn", "g"), _meft1_block),
    "meft2": Variant(1.0, 0.1, True, ("f", "ffn"), _meft2_block),
    "meft3": Variant(0.1, 0.1, False, ("attention", "ffn"), _meft3_block),
}


class TwoStreamStack:
    """What the encoder and decoder wrappers share: the reversible blocks of their layers and the two-stream run.
    Each sets ``layer_parts`` (how F and G reach a layer's sub-blocks) and ``stack_layers()``."""

    layer_parts: type

    def blocks(self) -> list[ReversibleBlock]:
        out = []
        for layer, adapters in zip(self.stack_layers(), self.adapters):
            f, g, f_modules, g_modules = self.variant.build(layer, self.layer_parts(layer, self.family), adapters)
            out.append(ReversibleBlock(f, g, f_modules, g_modules, self.lam, self.beta, self.variant.swap))
        return out

    def streams(self, hidden_states, **kwargs):
        """(x1, x2) after the last layer."""
        blocks = self.blocks()
        reversible = self.reversible and torch.is_grad_enabled()
        x1, x2 = run_stack(blocks[: self.num_rev_layers], hidden_states, hidden_states, kwargs, reversible,
                           segment_layers=self.segment_layers, fixed_point=self.stream_arithmetic == "fixed")
        return run_stack(blocks[self.num_rev_layers:], x1, x2, kwargs, reversible=False)


class MEFTEncoder(TwoStreamStack, nn.Module):
    """Stands in for the family's layer container: runs the pretrained layers as a two-stream reversible stack."""

    layer_parts = PostNormLayerParts

    def __init__(self, layers_attr: str, layers: nn.ModuleList, family: Family, variant: Variant,
                 options: MEFTOptions, hidden: int, activation: Callable[[], nn.Module]):
        super().__init__()
        self.layers_attr = layers_attr
        setattr(self, layers_attr, layers)  # same attribute name: pretrained parameter names do not change
        self.family, self.variant = family, variant
        self.lam = variant.lam if options.lambda_factor is None else options.lambda_factor
        self.beta = variant.beta if options.beta_factor is None else options.beta_factor
        self.num_rev_layers = len(layers) if options.num_rev_layers is None else options.num_rev_layers
        # reversible segments of this many layers (None: the whole reversible part is one segment)
        self.segment_layers = options.segment_layers
        self.stream_arithmetic = options.stream_arithmetic
        self.adapters = nn.ModuleList(
            nn.ModuleDict({name: Adapter(hidden, options.r, activation(), options.init_std) for name in variant.adapters})
            for _ in layers
        )
        self.reversible = True  # False: the same two-stream network under ordinary autograd (for tests)

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self, self.layers_attr)

    def stack_layers(self) -> nn.ModuleList:
        return self.layers

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                past_key_values=None, use_cache=None, **kwargs):
        from transformers.modeling_outputs import (
            BaseModelOutputWithPastAndCrossAttentions,
        )

        if encoder_hidden_states is not None or past_key_values is not None:
            raise ValueError("MEFT supports encoder (bidirectional, uncached) models: no cross-attention, no KV cache")
        x1, x2 = self.streams(hidden_states, attention_mask=attention_mask, **kwargs)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=(x1 + x2) / 2)


class PreNormLayerParts:
    """The two sub-blocks of a pre-norm decoder layer (LLaMA: RMSNorm, OPT: LayerNorm), by the family's paths.

    Same interface as :class:`PostNormLayerParts`, so the variants' block builders use either. Each sub-block keeps
    its own residual, as the post-norm ones do inside their LayerNorm:

        attention(x) = x + o + A(o)                     o = drop(attn(N1(x)))   (A: MEFT3's sequential adapter)
        ffn(a)       = a + drop(mlp(N2(a))) + A(N2(a))                          (A: the parallel FFN adapter)
    """

    def __init__(self, layer: nn.Module, family: Family):
        self.owner = layer  # its ``training`` flag drives the residual dropout
        self.attention_norm = get_path(layer, family.attention_norm)
        self.attention_core = get_path(layer, family.attention_core)
        self.ffn_norm = get_path(layer, family.ffn_norm)
        if family.ffn is not None:
            self.mlp = get_path(layer, family.ffn)
        else:
            ffn_in, ffn_act, ffn_out = (get_path(layer, p) for p in (family.ffn_in, family.ffn_act, family.ffn_out))
            self.mlp = lambda h: ffn_out(ffn_act(ffn_in(h)))
        self.dropout_p = float(getattr(layer, family.residual_dropout)) if family.residual_dropout else 0.0

    def _drop(self, h):
        if self.dropout_p == 0.0:
            return h
        return nn.functional.dropout(h, p=self.dropout_p, training=self.owner.training)

    def attention(self, x, adapter: Adapter | None = None, **kwargs):
        """x + drop(attn(N1(x))), a sequential adapter acting on the attention output before the residual."""
        out = self._drop(self.attention_core(hidden_states=self.attention_norm(x), **kwargs)[0])
        if adapter is not None:
            out = out + adapter(out)
        return x + out

    def ffn(self, a, adapter: Adapter | None = None):
        """a + drop(mlp(N2(a))); a parallel adapter reads the FFN input N2(a) and adds to the FFN output."""
        normed = self.ffn_norm(a)
        out = self._drop(self.mlp(normed))
        if adapter is not None:
            out = out + adapter(normed)
        return a + out

    def layer(self, x, ffn_adapter: Adapter | None = None, **kwargs):
        return self.ffn(self.attention(x, **kwargs), ffn_adapter)


# After a block, the stream that holds the output of the block's last pretrained sub-block (the one a decoder's final
# norm and LM head read at the start): meft1 swaps y1 = lam·x1 + layer(x2) into the second place, meft2 swaps
# y2 = beta·x2 + layer(y1) into the first, meft3 keeps y2 = beta·x2 + ffn(y1) second.
PRETRAINED_STREAM = {"meft1": 1, "meft2": 0, "meft3": 1}


class MEFTDecoder(TwoStreamStack, nn.Module):
    """Stands in for a pre-norm decoder's layer container (LLaMA's ``model``, OPT's ``model.decoder``).

    Holds the container's own children under their names (embeddings, positions, layers, final norm: parameter names
    do not change), builds the embeddings, causal mask and positions as the container's forward does, runs the layers
    as the two-stream reversible stack, and feeds the head ``final_norm(x_p + merge_weight · x_o)``: x_p is the stream
    holding the last pretrained sub-block's output (PRETRAINED_STREAM), x_o the other one, merge_weight a trained
    scalar starting at 0. No KV cache: each call runs the whole sequence.
    """

    layer_parts = PreNormLayerParts

    def __init__(self, container: nn.Module, layers_attr: str, family: Family, variant_name: str,
                 options: MEFTOptions, hidden: int, activation: Callable[[], nn.Module]):
        super().__init__()
        for name, child in container.named_children():  # same attribute names: pretrained names do not change
            self.add_module(name, child)
        for name in ("project_in", "project_out"):  # OPT keeps these as None when the widths agree
            if hasattr(container, name) and getattr(container, name) is None:
                setattr(self, name, None)
        self.config = container.config
        self.layers_attr, self.family, self.variant_name = layers_attr, family, variant_name
        self.variant = VARIANTS[variant_name]
        layers = self._modules[layers_attr]
        self.lam = self.variant.lam if options.lambda_factor is None else options.lambda_factor
        self.beta = self.variant.beta if options.beta_factor is None else options.beta_factor
        self.num_rev_layers = len(layers) if options.num_rev_layers is None else options.num_rev_layers
        self.segment_layers = options.segment_layers
        self.stream_arithmetic = options.stream_arithmetic
        self.adapters = nn.ModuleList(
            nn.ModuleDict({name: Adapter(hidden, options.r, activation(), options.init_std)
                           for name in self.variant.adapters})
            for _ in layers
        )
        self.merge_weight = nn.Parameter(torch.zeros(()))
        self.reversible = True  # False: the same two-stream network under ordinary autograd (for tests)

    def decoder_layers(self) -> nn.ModuleList:
        return self._modules[self.layers_attr]

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def stack_layers(self) -> nn.ModuleList:
        return self.decoder_layers()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        if past_key_values is not None:
            raise ValueError("MEFT runs the whole sequence at every call: no KV cache (pass use_cache=False)")
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            raise ValueError("MEFT does not return per-layer hidden states or attentions")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        make_inputs, after_norm = self.family.decoder_inputs
        hidden, block_kwargs = make_inputs(self, input_ids, attention_mask, position_ids, inputs_embeds)
        streams = self.streams(hidden, **block_kwargs)
        p = PRETRAINED_STREAM[self.variant_name]
        merged = streams[p] + self.merge_weight * streams[1 - p]
        norm = get_path(self, self.family.final_norm)
        out = norm(merged) if norm is not None else merged
        if after_norm is not None:
            out = after_norm(self, out)
        return BaseModelOutputWithPast(last_hidden_state=out)


def meft_encoder_of(model) -> MEFTEncoder | MEFTDecoder:
    """The MEFTEncoder (or, in a decoder, the MEFTDecoder) that ``prepare`` put into ``model``."""
    family = family_of(model)
    parent_path, _ = split_path(family.layers)
    backbone = backbone_of(model)
    encoder = get_path(backbone, parent_path) if parent_path else backbone
    if not isinstance(encoder, (MEFTEncoder, MEFTDecoder)):
        raise ValueError("this model has not been prepared with a MEFT method")
    return encoder


class _MEFT(Method):
    Options = MEFTOptions
    can_merge = False
    heads = frozenset({"seq_cls", "causal_lm"})
    # post-norm encoder blocks re-composed from the parts their run order shows; pre-norm decoder blocks likewise,
    # with the decoder's input builder from its family file (peftkit/models/families/)
    needs = ("recomposable_block",)
    # train.compile runs MEFT eagerly: dynamo breaks the graph at every exactness check of the streams (.item())
    compile_refusal = "its reversible layers are a custom autograd.Function that checks its streams on the host"
    # FSDP: the whole model is one unit. The reversible stack calls pieces of each block (attention, FFN, adapters)
    # rather than the block, so a block's own FSDP hooks would never gather it; as the root unit, the model is
    # gathered at its forward and stays gathered until its backward ends, which covers the stack's recomputation
    # in backward (ReversibleStackFunction.backward). Between steps every parameter is still sharded.
    fsdp_blocks = False

    def _layers_to_wrap(self, container, layers_attr: str):
        """The layer list MEFT will wrap, after the checks both wrappers need."""
        if isinstance(container, TwoStreamStack):
            raise UserError(f"{self.name}: the model is already prepared with MEFT; load a fresh base model.")
        layers = getattr(container, layers_attr)
        num_rev_layers = self.options.num_rev_layers
        if num_rev_layers is not None and num_rev_layers > len(layers):
            raise UserError(f"method.num_rev_layers: the model has {len(layers)} layers, got {num_rev_layers}; "
                            f"use at most {len(layers)} (or null for all).")
        return layers

    def prepare(self, model):
        from transformers.activations import ACT2FN

        options = self.options
        family = family_of(model)
        parent_path, layers_attr = split_path(family.layers)
        self.check_family(model)
        if family.norm_position == "pre":
            return self._prepare_decoder(model, family, parent_path, layers_attr)
        if not parent_path:
            raise UserError(f"{self.name}: the blocks of this {family.name} model sit directly in its bare model; MEFT "
                            f"replaces the container holding them. Use another method.")
        backbone = backbone_of(model)
        container = get_path(backbone, parent_path)
        layers = self._layers_to_wrap(container, layers_attr)
        mark_only_head_trainable(model)  # freezes embeddings, layers and LayerNorms
        config = model.config
        act = config.hidden_act
        encoder = MEFTEncoder(layers_attr, layers, family, VARIANTS[self.name], options, config.hidden_size,
                              activation=lambda: ACT2FN[act] if isinstance(act, str) else act)
        reference = next(layers.parameters())
        self._warn_if_reconstruction_is_fragile(encoder, reference.dtype)
        encoder.adapters.to(device=reference.device, dtype=reference.dtype)
        grand_path, container_attr = split_path(parent_path)
        setattr(get_path(backbone, grand_path) if grand_path else backbone, container_attr, encoder)
        return model

    def _prepare_decoder(self, model, family: Family, parent_path: str, layers_attr: str):
        """Replace the decoder's layer container (LLaMA: the backbone, OPT: ``model.decoder``) by a MEFTDecoder."""
        from transformers.activations import ACT2FN

        options, config = self.options, model.config
        backbone = backbone_of(model)
        if backbone is model:
            raise UserError(f"{self.name} on a {family.name} decoder needs a model with a head (task_head causal_lm "
                            f"or seq_cls), not the bare decoder.")
        if getattr(config, "layerdrop", 0.0):
            raise UserError(f"{self.name}: config.layerdrop is {config.layerdrop}; the reversible stack runs every "
                            f"layer. Set it to 0 in the model's config.json.")
        if parent_path:
            grand_path, container_attr = split_path(parent_path)
            owner = get_path(backbone, grand_path) if grand_path else backbone
        else:  # the backbone itself holds the layers (LLaMA): replace it on the task model
            owner = model
            container_attr = next(a for a in family.backbone if getattr(model, a, None) is backbone)
        container = getattr(owner, container_attr)
        layers = self._layers_to_wrap(container, layers_attr)
        mark_only_head_trainable(model)  # freezes embeddings, layers, norms and the LM head
        act = getattr(config, "hidden_act", None) or config.activation_function
        decoder = MEFTDecoder(container, layers_attr, family, self.name, options, config.hidden_size,
                              activation=lambda: ACT2FN[act] if isinstance(act, str) else act)
        reference = next(layers.parameters())
        self._warn_if_reconstruction_is_fragile(decoder, reference.dtype)
        decoder.adapters.to(device=reference.device, dtype=reference.dtype)
        decoder.merge_weight.data = decoder.merge_weight.data.to(device=reference.device, dtype=reference.dtype)
        setattr(owner, container_attr, decoder)
        # generate() would hand the decoder a KV cache it cannot use (each call runs the whole sequence)
        model.config.use_cache = False
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.use_cache = False
        return model

    def enable_gradient_checkpointing(self, model) -> None:
        raise UserError(f"train.gradient_checkpointing: {self.name} already keeps no per-layer activations (its "
                        f"reversible layers are reconstructed in backward); set train.gradient_checkpointing=false.")

    def _warn_if_reconstruction_is_fragile(self, encoder: MEFTEncoder, dtype: torch.dtype) -> None:
        """Each reversible layer divides by lambda (and beta), amplifying rounding by up to 1/(lambda·beta) over the
        layers reconstructed in one go (a segment); warn when that bound times the dtype's epsilon exceeds 1.
        Measured in fp32, max relative gradient error of a layer vs autograd (gradient_errors_by_block):
        minilm-l6, one segment: meft1 8e-3, meft2 1e-2, meft3 1.0; segments of 2 layers: 3e-6, 2e-6, 1e-5.
        12-layer BERT of width 32, one segment: 1.0, 1.7, 1.0; segments of 2 layers: 4e-7, 6e-7, 4e-6."""
        if encoder.stream_arithmetic == "fixed":
            return  # exact reconstruction: nothing is amplified
        span = min(encoder.num_rev_layers, encoder.segment_layers or encoder.num_rev_layers)
        amplification = (1.0 / min(encoder.lam * encoder.beta, 1.0)) ** span
        if amplification * torch.finfo(dtype).eps > 1.0:
            warnings.warn(
                f"{self.name}: the backward pass reconstructs activations through {span} reversible layers at a time "
                f"(lambda={encoder.lam}, beta={encoder.beta}), which in {dtype} can amplify rounding up to "
                f"{amplification:.0e}x, so the lower layers' gradients may be wrong. Set method.segment_layers to 2 or 3 "
                f"(the streams between segments are then kept), or method.num_rev_layers lower (the layers above keep "
                f"ordinary activations), or method.stream_arithmetic to fixed (exact)" +
                (", or train in float32." if torch.finfo(dtype).eps > 1e-6 else "."),
                stacklevel=3)


@METHODS.register("meft1", help="MEFT1 (reversible): F = pretrained layer, G = adapter, lambda 0.1.")
class MEFT1(_MEFT):
    name = "meft1"


@METHODS.register("meft2", help="MEFT2 (reversible): F = adapter, G = pretrained layer, beta 0.1.")
class MEFT2(_MEFT):
    name = "meft2"


@METHODS.register("meft3", help="MEFT3 (reversible): F = attention, G = FFN, lambda = beta = 0.1.")
class MEFT3(_MEFT):
    name = "meft3"
