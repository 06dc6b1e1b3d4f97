"""What a loaded transformers model tells about itself, without a list of families.

Every architecture transformers ships is a stack of identical blocks holding projections (``nn.Linear``, or GPT-2's
``Conv1D`` with its weight transposed) and norms. From the module tree and one traced forward of a block we read:

  layers        the ModuleList of blocks (the list of identical modules as long as ``num_hidden_layers``)
  projections   every projection of a block, with its side (attention or MLP), its role (input-side, i.e. reading
                the residual stream: q/k/v, gate/up; or output-side: writing back into it: o, down), widths, bias
  fused         a block whose attention has one input-side projection computes q, k and v in one matmul
                (Phi-3's ``qkv_proj``, GPT-2's ``c_attn``, ModernBERT's ``Wqkv``); an MLP whose output-side
                projection reads half of what its input side writes has fused gate and up (``gate_up_proj``, ``Wi``)
  norm position "pre" when the block's first module to run is a norm (LLaMA, GPT-2, OPT), else "post" (BERT)
  tied          whether the output embedding is the input embedding's tensor
  causal        whether a block's output at one position ignores the later tokens (a decoder's self-attention)
  run order     the block's leaf modules in the order they run, and the first norm to run after the last block, from
                which the parts of a block (attention core, norms, dropouts, activation) are located

``structure_from_config`` reads the same from a shrunken random model built from a config (two blocks, width 64),
so what a checkpoint is can be told from its config.json before any weight loads.

A family file is needed only for what this cannot tell (for example how MEFT rebuilds a decoder block's inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_WORDS = ("attn", "attention")


@dataclass(frozen=True)
class Projection:
    path: str  # dotted path inside one block, e.g. "self_attn.q_proj"
    side: str  # "attention" | "mlp"
    reads_stream: bool  # input-side: its input is the (normed) residual stream
    in_features: int
    out_features: int
    bias: bool
    transposed: bool  # GPT-2's Conv1D stores the weight as (in, out)

    @property
    def leaf(self) -> str:
        return self.path.rpartition(".")[2]


@dataclass(frozen=True)
class Structure:
    layers_path: str  # dotted path from the model to its ModuleList of blocks
    num_layers: int
    hidden_size: int
    projections: tuple[Projection, ...]  # of one block, in the order they run
    norm_position: str  # "pre" | "post"
    fused_qkv: bool
    fused_gate_up: bool
    gated_mlp: bool
    tied_embeddings: bool
    causal: bool = False
    # the block's leaf modules in the order one forward runs them: (path inside the block, kind), kind one of
    # "projection" | "norm" | "dropout" | "other"
    run_order: tuple[tuple[str, str], ...] = ()
    # the first norm that runs after the last block, as a path from the model
    final_norm_path: str | None = None
    # the container of the blocks hands each block the attention mask it was given (BERT builds its mask before
    # the encoder; DeBERTa's encoder builds its own from the 2-D one, with relative positions)
    container_passes_mask: bool = False

    def of_side(self, side: str) -> tuple[Projection, ...]:
        return tuple(p for p in self.projections if p.side == side)

    @property
    def linear_leaf_names(self) -> tuple[str, ...]:
        """The projections' leaf names, as peft's ``target_modules`` matches them (attention first)."""
        names: list[str] = []
        for p in (*self.of_side("attention"), *self.of_side("mlp")):
            if p.leaf not in names:
                names.append(p.leaf)
        return tuple(names)

    @property
    def mlp_biases(self) -> bool:
        return all(p.bias for p in self.of_side("mlp"))


def _is_projection(module) -> bool:
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    # transformers' Conv1D (GPT-2): a Linear with its weight stored transposed; matched by name and shape, since
    # transformers moves the class between modules across versions
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and weight is not None and weight.dim() == 2


def find_layers(model) -> tuple[str, object]:
    """(dotted path, ModuleList) of the model's blocks: the ModuleList of same-class modules whose length is the
    config's layer count, the one holding the most parameters when several qualify."""
    import torch

    config = getattr(model, "config", None)
    want = None
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        want = getattr(config, key, None)
        if isinstance(want, int):
            break
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1 or (want is not None and len(module) != want):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[2]:
            best = (name, module, size)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of {want} identical blocks")
    return best[0], best[1]


@dataclass
class _Trace:
    ran: list[tuple[str, object]]  # the block's leaves, in run order, each once
    after: list[str]  # the model's leaves that ran after the block's last leaf (full names)
    causal: bool
    container_passes_mask: bool


def _first_tensor(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return _first_tensor(value[0])
    return getattr(value, "last_hidden_state", None)


def _trace_block(model, layers_path: str, block) -> _Trace:
    """One forward of the model on 8 tokens, recording the order in which leaves run; a second forward with the last
    token changed tells whether the block's output at the first position depends on later tokens."""
    import torch

    block_names = {id(m): n for n, m in block.named_modules()}
    model_names = {id(m): n for n, m in model.named_modules()}
    order: list[tuple[str, object]] = []
    outputs: list = []
    masks: dict[str, object] = {}

    def record(mod, args):
        order.append((model_names.get(id(mod), ""), mod))

    def keep_mask(key):
        def hook(mod, args, kwargs):
            masks[key] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        return hook

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if not list(m.children())]
    hooks.append(block.register_forward_hook(lambda mod, args, out: outputs.append(_first_tensor(out))))
    container = model.get_submodule(layers_path.rpartition(".")[0]) if "." in layers_path else None
    if container is not None:
        hooks.append(container.register_forward_pre_hook(keep_mask("container"), with_kwargs=True))
        hooks.append(block.register_forward_pre_hook(keep_mask("block"), with_kwargs=True))
    vocab = getattr(model.config, "vocab_size", None) or 8
    ids = torch.arange(8).remainder(max(vocab - 3, 1)).add(3).unsqueeze(0)  # clear of the usual special ids
    changed = ids.clone()
    changed[0, -1] = 3 if int(ids[0, -1]) != 3 else 4
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            traced = len(order)
            model(input_ids=changed, attention_mask=torch.ones_like(ids))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    order = order[:traced]
    seen, unique = set(), []
    for _, module in order:
        if id(module) in block_names and id(module) not in seen:
            seen.add(id(module))
            unique.append((block_names[id(module)], module))
    last = max((i for i, (_, m) in enumerate(order) if id(m) in block_names), default=len(order))
    causal = bool(outputs[0] is not None and outputs[-1] is not None
                  and torch.equal(outputs[0][0, 0], outputs[-1][0, 0]))
    return _Trace(ran=unique, after=[name for name, _ in order[last + 1:]], causal=causal,
                  container_passes_mask=container is not None and masks.get("container") is masks.get("block"))


def _kind(module) -> str:
    import torch

    if _is_projection(module):
        return "projection"
    if _is_norm(module):
        return "norm"
    if isinstance(module, torch.nn.Dropout):
        return "dropout"
    return "other"


def _is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower()


def structure_of(model) -> Structure:
    """The Structure of a transformers model (a task model or a bare backbone). Runs one forward of 8 tokens."""
    layers_path, layers = find_layers(model)
    block = layers[len(layers) - 1]  # the last block: some families make the first one special (ModernBERT's norm)
    trace = _trace_block(model, layers_path, block)
    ran = trace.ran
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    projections = []
    for path, module in ran:
        if not _is_projection(module):
            continue
        transposed = type(module).__name__ == "Conv1D"
        rows, cols = module.weight.shape
        in_features, out_features = (rows, cols) if transposed else (cols, rows)
        side = "attention" if any(w in part.lower() for part in path.split(".")[:-1] or [path]
                                  for w in ATTENTION_WORDS) else "mlp"
        projections.append(Projection(path=path, side=side, reads_stream=in_features == hidden,
                                      in_features=in_features, out_features=out_features,
                                      bias=getattr(module, "bias", None) is not None, transposed=transposed))
    # an output-side projection that maps hidden -> hidden (attention's o) reads the attention's result, not the
    # stream: it is the last attention projection to run
    attention = [p for p in projections if p.side == "attention"]
    if attention and attention[-1].in_features == attention[-1].out_features == hidden:
        last = attention[-1]
        projections[projections.index(last)] = Projection(**{**last.__dict__, "reads_stream": False})
    attention = [p for p in projections if p.side == "attention"]
    mlp = [p for p in projections if p.side == "mlp"]
    mlp_in = [p for p in mlp if p.reads_stream]
    mlp_out = [p for p in mlp if not p.reads_stream]
    fused_gate_up = len(mlp_in) == 1 and bool(mlp_out) and mlp_in[0].out_features == 2 * mlp_out[-1].in_features
    first_leaf = next((module for _, module in ran if list(module.parameters())), None)
    embeddings_in = model.get_input_embeddings()
    embeddings_out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return Structure(
        layers_path=layers_path,
        num_layers=len(layers),
        hidden_size=hidden,
        projections=tuple(projections),
        norm_position="pre" if first_leaf is not None and _is_norm(first_leaf) else "post",
        fused_qkv=sum(p.reads_stream for p in attention) == 1,
        fused_gate_up=fused_gate_up,
        gated_mlp=len(mlp_in) == 2 or fused_gate_up,
        tied_embeddings=bool(embeddings_out is not None and embeddings_in is not None
                             and embeddings_out.weight is embeddings_in.weight),
        causal=trace.causal,
        run_order=tuple((path, _kind(module)) for path, module in ran),
        final_norm_path=next((name for name in trace.after if _is_norm(model.get_submodule(name))), None),
        container_passes_mask=trace.container_passes_mask,
    )


SMALL_HIDDEN, SMALL_FFN, SMALL_HEADS, SMALL_HEAD_DIM = 64, 128, 4, 16
_FROM_CONFIG: dict[str, Structure] = {}


def shrunken_config(config):
    """A copy of ``config`` with two blocks and width 64: every width equal to the hidden size becomes 64, every
    width equal to the FFN size 128 (names through the config's own attribute_map), 4 heads of 16."""
    import copy

    small = copy.deepcopy(config)
    hidden = getattr(config, "hidden_size", None)
    ffn = next((getattr(config, k) for k in ("intermediate_size", "ffn_dim", "hidden_dim", "n_inner", "d_ff")
                if isinstance(getattr(config, k, None), int)), None)
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None)
    for key, value in config.to_dict().items():
        if not isinstance(value, int) or isinstance(value, bool) or key.endswith("token_id") or key == "vocab_size":
            continue
        if value == hidden:
            setattr(small, key, SMALL_HIDDEN)
        elif ffn is not None and value == ffn:
            setattr(small, key, SMALL_FFN)
    small.num_hidden_layers = 2  # the last block is read: two, as some families make the first block special
    if isinstance(heads, int):
        small.num_attention_heads = SMALL_HEADS
    if isinstance(kv, int):
        small.num_key_value_heads = SMALL_HEADS if kv == heads else SMALL_HEADS // 2
    if isinstance(getattr(config, "head_dim", None), int):
        small.head_dim = SMALL_HEAD_DIM
    if isinstance(getattr(config, "layer_types", None), list):
        small.layer_types = config.layer_types[-2:]
    if hasattr(config, "global_attn_every_n_layers"):
        small.global_attn_every_n_layers = 1
    if isinstance(getattr(config, "max_position_embeddings", None), int):
        small.max_position_embeddings = min(config.max_position_embeddings, 512)
    small.vocab_size = min(getattr(config, "vocab_size", 1024) or 1024, 1024)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id"):
        value = getattr(small, key, None)
        if isinstance(value, int) and value >= small.vocab_size:
            setattr(small, key, small.vocab_size - 1)
    return small


def structure_from_config(config) -> Structure:
    """The Structure of the architecture ``config`` describes, read from a shrunken random model built from it
    (no weights are read); cached per config."""
    import torch
    from transformers import AutoModel

    key = config.to_json_string(use_diff=False)
    if key not in _FROM_CONFIG:
        small = shrunken_config(config)
        # the first call may come from inside a caller's forward (layers_of in a model's forward) under a FLOP counter
        # or another dispatch mode: the shrunken model's forwards are not the caller's computation
        with _outside_dispatch_modes(), torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModel.from_config(small)
            _FROM_CONFIG[key] = structure_of(model)
    return _FROM_CONFIG[key]


def _outside_dispatch_modes():
    """A context in which torch's active dispatch modes (FlopCounterMode, ...) do not see the operations run."""
    import contextlib

    try:
        from torch.utils._python_dispatch import _disable_current_modes
    except ImportError:  # a torch without it: the modes see the trace, which changes no result
        return contextlib.nullcontext()
    return _disable_current_modes()
