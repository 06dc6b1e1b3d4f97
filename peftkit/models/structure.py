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


def _trace_block(model, block) -> list[tuple[str, object]]:
    """(path inside ``block``, module) of the block's leaf modules in the order one forward of the model runs them."""
    import torch

    names = {id(m): n for n, m in block.named_modules()}
    order: list[tuple[str, object]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: order.append((names[id(mod)], mod)))
             for m in block.modules() if not list(m.children())]
    vocab = getattr(model.config, "vocab_size", None) or 8
    ids = torch.arange(8).remainder(max(vocab - 3, 1)).add(3).unsqueeze(0)  # clear of the usual special ids
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    seen, unique = set(), []
    for path, module in order:
        if id(module) not in seen:
            seen.add(id(module))
            unique.append((path, module))
    return unique


def _is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower()


def structure_of(model) -> Structure:
    """The Structure of a transformers model (a task model or a bare backbone). Runs one forward of 8 tokens."""
    layers_path, layers = find_layers(model)
    block = layers[len(layers) - 1]  # the last block: some families make the first one special (ModernBERT's norm)
    ran = _trace_block(model, block)
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
    )
