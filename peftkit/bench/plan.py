"""What a training run of a recipe will hold per device, from the model's config alone (no weight is read).

    weights             the frozen parameters: at the model's dtype, or packed at ``bits`` for the block projections
                        (GPTQ layout: codes, one float16 scale and one packed zero per group of ``group_size`` input
                        columns, an int32 group index per input column); embeddings, norms and the head stay at dtype
    trainable           the parameters the method trains (adapters, sparse values, the task head, everything)
    gradients           one per trainable parameter, in its dtype
    optimizer state     AdamW: two moments per trainable parameter in its dtype; adamw8bit: two bytes per parameter
    activations         what the training step adds on top: the tensors autograd keeps for backward (every layer's
                        for full, LoRA, PaFi; only the streams for MEFT, flat in depth; only layer inputs with
                        gradient checkpointing) plus what the backward pass builds while they are still held (one
                        layer's worth of gradients of activations and recomputed tensors, and the loss's gradient
                        over the vocabulary for a language model)
    communication       under torchrun: DDP's gradient buckets (a second copy of the gradients) or FSDP's gathered
                        blocks (the current and the prefetched block, unsharded)

The peak is weights + trainable + optimizer state + communication + the larger of (gradients) and (activations +
the head's gradients): the trainer frees the gradients before each forward (zero_grad(set_to_none=True)), so at
the start of the backward pass the activations are all alive and only the head's gradients exist; when the last
gradient is written the activations are gone. A trained embedding tied to the output layer adds two of its sizes to
the gradients' side: its two gradient contributions and their sum meet at the end of backward. Under ``train.strategy: fsdp`` with N processes, weights, trainable
parameters, gradients and optimizer state are sharded (divided by N); activations are per process. Under ddp each
process holds a full replica.

The activation model, per token and layer, in elements (times the activation dtype's bytes). The coefficients of the
saved tensors were read off bench.costs.saved_tensor_bytes over tiny random models (widths, depths, vocabularies,
heads and lengths varied one at a time; every fit exact to a few bytes per token), the backward's extra once from
fresh-process peak RSS on the calibration models of scripts/plan_vs_measured.py --calibrate (random-weight BERT
h256/4 layers and LLaMA h192/6 layers at batch 16; the models and batches validated are others): 0.16 of a block.

    post-norm blocks (BERT: attention probabilities kept, with their dropout): 10.1 h + 2 i + 3 heads * seq
    pre-norm blocks (LLaMA: SDPA keeps no seq^2 term): 7.7 h (frozen projections: 5.8 h) + 4 i (2 i ungated)
                                                     + 2.4 kv_width
    LoRA and the packed base add its input per block (0.75 h post-norm), A's output (r per adapted projection; the
    sweep ran at r 8) and, with dropout, a dropped copy of each adapter's input and its mask; MEFT keeps 7.1 h
    (post-norm) or 8.1 h (pre-norm) per token whatever the depth, and recomputes one block in backward.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from peftkit.errors import UserError

GIB = 2**30
UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
         "g": GIB, "gb": 10**9, "gib": GIB, "t": 2**40, "tb": 10**12, "tib": 2**40}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
DEFAULT_GROUP = 64  # the group size of the shipped quantize recipes, used where a plan asks for bits by itself

# ---- the activation model: elements per token ------------------------------------------------------------------
# per block: (h, i, heads*seq, kv_width) coefficients of the tensors autograd saves
STACK = {  # method class -> norm position -> coefficients
    "dense": {"post": (10.08, 2.0, 3.0, 0.0), "pre": (7.74, 4.0, 0.0, 2.375)},    # every projection trains
    "frozen": {"post": (10.08, 2.0, 3.0, 0.0), "pre": (5.77, 4.0, 0.0, 2.375)},   # sparse or no weight gradient
    "adapter": {"post": (10.83, 2.0, 3.0, 0.0), "pre": (5.77, 4.0, 0.0, 2.375)},  # LoRA keeps its input
}
OUTSIDE_BLOCKS = {"dense": {"post": 3.0, "pre": 3.58}, "frozen": {"post": 1.0, "pre": 0.53},
                  "adapter": {"post": 1.0, "pre": 0.53}}  # embeddings' norm/dropout, final norm: x h
SWEEP_RANK = 8  # LoRA's rank in the sweep the "adapter" coefficients come from
MEFT_STREAMS = {"post": 7.11, "pre": 8.06}  # x h per token, independent of depth (embeddings' included)
CHECKPOINTED_INPUT = 1.0  # x h per block: gradient checkpointing keeps each block's input only
# the backward pass's own allocations while the saved tensors are held, in blocks' worth of activations: fitted once
# as the mean over the eight calibration runs (scripts/plan_vs_measured.py --calibrate: 0.12 to 0.16 for every
# BERT-shaped run and LLaMA's full fine-tuning; LLaMA's LoRA, PaFi and MEFT scatter around it, -0.97 to 1.06, where
# the vocabulary-wide loss tensors are 90% of the activations and one block is 2% of them). The loss: the saved
# log-probabilities, their gradient and the logits' gradient are three float32 tensors per token over the vocabulary.
BACKWARD_BLOCKS = 0.16
LOSS_VOCAB_TENSORS = 3.0

# ---- what each method trains and keeps --------------------------------------------------------------------------
# kind: dense (every parameter), adapter (LoRA-shaped: r*(in+out) per projection), sparse (round(rho*N) of the block
# projections), biases, head, meft (two bottleneck adapters d->r->d per block); stack: the activation class;
# flat: activations do not grow with depth (MEFT's reversible blocks)
METHODS = {
    "full": {"trains": "dense", "stack": "dense"},
    "lora": {"trains": "adapter", "stack": "adapter"},
    "apiq": {"trains": "adapter", "stack": "adapter"},
    "pafi": {"trains": "sparse", "stack": "frozen"},
    "bitfit": {"trains": "biases", "stack": "frozen"},
    "head-only": {"trains": "head", "stack": None},
    "meft1": {"trains": "meft", "stack": "adapter", "flat": True},
    "meft2": {"trains": "meft", "stack": "adapter", "flat": True},
    "meft3": {"trains": "meft", "stack": "adapter", "flat": True},
}


@dataclass(frozen=True)
class PlanRow:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    rows: list[PlanRow]
    total: int
    memory: int | None
    facts: dict = field(default_factory=dict)

    def bytes_of(self, name: str) -> int:
        return next(r.bytes for r in self.rows if r.name == name)

    @property
    def fits(self) -> bool | None:
        return None if self.memory is None else self.total <= self.memory

    def to_dict(self) -> dict:
        return {"rows": [{"name": r.name, "bytes": r.bytes, "note": r.note} for r in self.rows], "total": self.total,
                "memory": self.memory, "fits": self.fits, **self.facts}

    def table(self) -> str:
        f = self.facts
        processes = f"{f['strategy']} over {f['world_size']} processes" if f["world_size"] > 1 else "one process"
        lines = [f"{f['model']}: {f['method']}, batch {f['batch']} x {f['seq']} tokens, {f['weights_format']}, "
                 f"{processes}, {f['device']}",
                 f"{'':22s}{'per device':>12s}"]
        for row in self.rows:
            lines.append(f"{row.name:22s}{human(row.bytes):>12s}  {row.note}")
        tied = f" + tied embedding's two gradients {human(f['tied_gradient_sum_bytes'])}" if f["tied_gradient_sum_bytes"] else ""
        lines.append(f"{'peak':22s}{human(self.total):>12s}  weights + trainable + optimizer state + communication "
                     f"+ max(gradients{tied}, activations + head gradients {human(f['head_gradient_bytes'])})")
        if self.memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"{'memory':22s}{human(self.memory):>12s}  {verdict} ({self.facts['memory_source']}; "
                         f"{100 * self.total / self.memory:.0f}% of it)")
        return "\n".join(lines)


def human(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def parse_memory(text: str) -> int:
    """'24GiB', '80 GB', '512MiB', '1.5g' or a plain byte count -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    unit = match and match.group(2).lower()
    if not match or unit not in UNITS or float(match.group(1)) <= 0:
        raise UserError(f"--memory {text!r} is not a memory size. Write a number with a unit, e.g. 24GiB, 80GB or "
                        f"512MiB (binary KiB/MiB/GiB/TiB, decimal KB/MB/GB/TB).")
    return int(float(match.group(1)) * UNITS[unit])


def machine_memory(device: str) -> tuple[int, str]:
    """(bytes, where the figure came from): the GPU's memory on cuda, else this machine's RAM."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda, but this machine has no GPU to read the memory of. Pass the GPU's memory "
                            "with --memory (e.g. --memory 80GiB), or plan for --device cpu.")
        return torch.cuda.get_device_properties(0).total_memory, f"{torch.cuda.get_device_name(0)}'s memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


# ---- the model, from its config ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFacts:
    name: str
    config: object
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_width: int
    vocab: int
    norm_position: str
    gated_mlp: bool
    total_params: int
    head_params: int  # the task head's (classifier, pooler) or the language-model output's
    projections: tuple[tuple[str, int, int, bool], ...]  # one block's (leaf name, in, out, bias)
    block_params: int  # one block's parameters
    quantized: dict | None  # bits, group_size, lora_r of a quantize output
    causal: bool = False  # a language model's head (the loss runs over the vocabulary)
    tied_params: int = 0  # the input embedding's parameters where the output layer is the same tensor


def read_config(recipe):
    """(the transformers config of ``recipe.model.name``, its local directory or None): a directory with a
    config.json, an alias, or a hub id whose config.json is reachable (only that file is fetched)."""
    from transformers import AutoConfig

    from peftkit.models.aliases import resolve_model

    name = recipe.model.name
    path = Path(resolve_model(name))
    local = (path / "config.json").is_file()
    where = path / "config.json" if local else name
    try:
        if not local and path.exists():
            raise OSError(f"{path} has no config.json")
        config = AutoConfig.from_pretrained(str(path) if local else name,
                                            trust_remote_code=recipe.model.trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError) as e:
        if local:
            raise UserError(f"model.name {name!r}: {where} is not a config transformers reads "
                            f"({str(e).splitlines()[0]}). Fix the file or choose another model.") from None
        raise UserError(f"model.name {name!r}: no config.json found there ({str(e).splitlines()[0]}). The plan reads "
                        f"only the model's config: point model.name at a directory that has one (a checkpoint, a "
                        f"quantize output, or a config.json written by hand such as configs/plan/llama3-8b), or a "
                        f"hub id whose config is reachable.") from None
    return config, (path if local else None)


def model_facts(recipe) -> ModelFacts:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from peftkit.methods.base import is_head_parameter
    from peftkit.models.structure import find_layers, structure_from_config

    config, path = read_config(recipe)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the packed layout is what this module counts; no quantizer is needed
    causal = recipe.model.task_head == "causal_lm"
    builder = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    if not causal:
        config.num_labels = _num_labels(recipe)
    with torch.device("meta"):
        model = builder.from_config(config)
    try:
        _, blocks = find_layers(model)
    except ValueError as e:
        raise UserError(f"model.name {recipe.model.name!r}: the plan cannot tell this model's blocks ({e}); it plans "
                        f"transformer stacks of identical blocks.") from None
    block = blocks[-1]
    projections = tuple((name.rpartition(".")[2], m.in_features, m.out_features, m.bias is not None)
                        for name, m in block.named_modules() if isinstance(m, torch.nn.Linear))
    structure = structure_from_config(config)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    params = dict(model.named_parameters())  # tied tensors appear once
    tied = 0
    if causal:
        output = model.get_output_embeddings()
        head = output.weight.numel() if output is not None else 0
        if output is not None and output.weight is model.get_input_embeddings().weight:
            tied = head
    else:
        head = sum(p.numel() for n, p in params.items() if is_head_parameter(n))
    quantized = None
    info = path / "quantization.json" if path is not None else None
    if info is not None and info.is_file():
        data = json.loads(info.read_text())
        adapter = path / "adapter_config.json"
        r = json.loads(adapter.read_text()).get("r") if adapter.is_file() else None
        quantized = {"bits": data.get("bits"), "group_size": data.get("group_size") or DEFAULT_GROUP, "lora_r": r}
    return ModelFacts(name=recipe.model.name, config=config, layers=len(blocks), hidden=int(config.hidden_size),
                      intermediate=int(getattr(config, "intermediate_size", 4 * config.hidden_size)), heads=heads,
                      kv_width=kv_heads * head_dim, vocab=int(config.vocab_size), norm_position=structure.norm_position,
                      gated_mlp=structure.gated_mlp, total_params=sum(p.numel() for p in params.values()),
                      head_params=head, projections=projections,
                      block_params=sum(p.numel() for p in block.parameters()), quantized=quantized,
                      causal=causal, tied_params=tied)


def _num_labels(recipe) -> int:
    """The task head's width where the task knows it without reading data (GLUE), else 2 (a head's few bytes)."""
    try:
        from peftkit.train.pipeline import create_task

        return int(create_task(recipe).head()[0] or 2)
    except Exception:  # a task that must read its rows to know its labels: the head is a rounding error here
        return 2


# ---- the arithmetic -------------------------------------------------------------------------------------------
def packed_bytes(n_in: int, n_out: int, bits: int, group: int) -> int:
    """One projection's weight packed as GPTQ stores it: codes, float16 scales, packed zeros, int32 group index."""
    groups = math.ceil(n_in / group)
    return n_in * n_out * bits // 8 + groups * n_out * 2 + groups * n_out * bits // 8 + 4 * n_in


def adapted(facts: ModelFacts, options: dict) -> tuple[int, list]:
    """(LoRA's rank, the projections of a block it adapts): the recipe's r and targets, else the quantize output's."""
    r = options.get("r") or (facts.quantized or {}).get("lora_r") or 8
    targets = options.get("targets")
    return r, [p for p in facts.projections if not isinstance(targets, list) or p[0] in targets]


def trainable_params(facts: ModelFacts, method: str, options: dict) -> int:
    kind = METHODS[method]["trains"]
    blocks = facts.layers
    if kind == "dense":
        return facts.total_params
    head = 0 if facts.causal else facts.head_params
    if kind == "adapter":
        r, chosen = adapted(facts, options)
        return blocks * sum(r * (n_in + n_out) for _, n_in, n_out, _ in chosen) + head
    if kind == "sparse":
        pool = blocks * sum(n_in * n_out + (n_out if options.get("include_bias") and bias else 0)
                            for _, n_in, n_out, bias in facts.projections)
        return round(options.get("rho", 0.005) * pool) + head
    if kind == "biases":
        return blocks * sum(n_out for _, _, n_out, bias in facts.projections if bias) + head
    if kind == "meft":
        r, h = options.get("r", 8), facts.hidden
        return blocks * 2 * (2 * h * r + r + h) + head
    return head


@dataclass(frozen=True)
class Activations:
    """Per token: elements autograd saves (``saved``, at the activation dtype; the log-probabilities of a language
    model's loss are the ``loss_saved`` float32 ones), and what the backward pass adds while they are held."""
    saved: float
    backward: float
    loss_saved: float
    loss_backward: float
    note: str

    def bytes(self, tokens: int, element: int) -> int:
        return int(tokens * ((self.saved + self.backward) * element + (self.loss_saved + self.loss_backward) * 4))


def activation_model(facts: ModelFacts, method: str, options: dict, seq: int, checkpointing: bool) -> Activations:
    """The activation model of ``method`` on the model ``facts`` describe, for rows of ``seq`` tokens."""
    stack = METHODS[method]["stack"]
    vocab = facts.vocab if facts.causal else 0
    loss_saved, loss_backward = vocab, (LOSS_VOCAB_TENSORS - 1) * vocab
    loss_note = f"; loss over {facts.vocab:,} tokens" if facts.causal else ""
    if stack is None:  # the head alone trains: nothing of the blocks is kept
        return Activations(facts.hidden, 0.0, loss_saved, loss_backward, "the head's input only" + loss_note)
    a_h, a_i, a_s, a_kv = STACK[stack][facts.norm_position]
    if not facts.gated_mlp:
        a_i = 2.0
    block = a_h * facts.hidden + a_i * facts.intermediate + a_s * facts.heads * seq + a_kv * facts.kv_width
    if METHODS[method]["trains"] == "adapter":
        # each adapter keeps A's output (r per token) for B's gradient, the coefficients above at r = SWEEP_RANK;
        # with dropout each adapter also keeps its own dropped copy of its input and the mask (one byte a value)
        r, chosen = adapted(facts, options)
        block += (r - SWEEP_RANK) * len(chosen)
        if options.get("dropout"):
            block += 1.25 * sum(n_in for _, n_in, _, _ in chosen)
    outside = OUTSIDE_BLOCKS[stack][facts.norm_position] * facts.hidden
    if METHODS[method].get("flat"):
        reversible = options.get("num_rev_layers") or facts.layers
        kept = facts.layers - min(reversible, facts.layers)
        streams = MEFT_STREAMS[facts.norm_position]
        saved, backward = streams * facts.hidden + kept * block, (1 + BACKWARD_BLOCKS) * block
        note = f"reversible streams {streams} h per token, flat in depth; one block recomputed"
    elif checkpointing:
        saved = facts.layers * CHECKPOINTED_INPUT * facts.hidden + outside
        backward = (1 + BACKWARD_BLOCKS) * block
        note = "checkpointed: each block's input; one block recomputed"
    else:
        saved, backward = facts.layers * block + outside, BACKWARD_BLOCKS * block
        note = f"{facts.layers} blocks x {block / facts.hidden:.1f} h per token"
    return Activations(saved, backward, loss_saved, loss_backward, note + loss_note)


def plan_recipe(recipe, world_size: int = 1, device: str = "cpu", bits: int | None = None,
                memory: int | None = None, memory_source: str = "--memory") -> Plan:
    """The per-device plan of training ``recipe`` (a loaded finetune recipe) on ``world_size`` processes."""
    method = recipe.method_name
    if method not in METHODS:
        raise UserError(f"peftkit plan has no memory model for method {method!r}; it plans {', '.join(METHODS)}. "
                        f"Measure that method with `peftkit bench memory` instead.")
    options = dict(recipe.method) if not hasattr(recipe.method, "model_dump") else recipe.method.model_dump()
    facts = model_facts(recipe)
    dtype = DTYPE_BYTES[recipe.model.dtype]
    if recipe.model.dtype == "auto" and device == "cpu":
        dtype = 4
    train = recipe.train
    act_bytes = 2 if (dtype == 2 or train.precision in ("bf16", "fp16")) else 4
    quant = dict(facts.quantized or {})
    if bits is not None:
        if METHODS[method]["trains"] in ("dense", "sparse", "biases"):
            raise UserError(f"--bits {bits}: method {method} changes the base weights themselves, which a packed "
                            f"base cannot take. Plan a method with a frozen base (lora, meft1-3, apiq, head-only).")
        quant = {"bits": bits, "group_size": quant.get("group_size", DEFAULT_GROUP), "lora_r": quant.get("lora_r")}
    trainable = trainable_params(facts, method, options)
    # the frozen base: block projections packed at bits where quantized, the rest at dtype
    projection_params = facts.layers * sum(n_in * n_out for _, n_in, n_out, _ in facts.projections)
    if quant.get("bits"):
        packed = facts.layers * sum(packed_bytes(n_in, n_out, quant["bits"], quant["group_size"])
                                    for _, n_in, n_out, _ in facts.projections)
        frozen = packed + (facts.total_params - projection_params) * dtype
        weights_format = f"{quant['bits']}-bit packed blocks (group {quant['group_size']}), the rest {recipe.model.dtype}"
    else:
        frozen = facts.total_params * dtype
        weights_format = recipe.model.dtype
    trains = METHODS[method]["trains"]
    dense = trains == "dense"
    # parameters trained in place leave the frozen base (the task head, BitFit's biases); adapters, MEFT's
    # bottlenecks and PaFi's selected values are new tensors beside it
    in_place = facts.head_params if not facts.causal else 0
    if trains == "biases":
        in_place = trainable
    frozen = 0 if dense else max(frozen - in_place * dtype, 0)
    trainable_dtype = dtype if dense else 4  # adapters, sparse values and heads train in fp32
    trainable_bytes = trainable * trainable_dtype
    grads = trainable * trainable_dtype
    state_per = 2 if train.optimizer == "adamw8bit" else 2 * trainable_dtype
    optimizer = trainable * state_per
    checkpointing = train.gradient_checkpointing
    if checkpointing is None:
        from peftkit.methods import create_method

        checkpointing = bool(create_method(method, options).checkpoints_by_default)
    tokens, seq = train.batch_size * recipe.data.max_length, recipe.data.max_length
    model = activation_model(facts, method, options, seq, checkpointing)
    activations, act_note = model.bytes(tokens, act_bytes), model.note
    if quant.get("bits"):  # a packed projection is unpacked for its matmul (forward and backward), one at a time
        activations += max(n_in * n_out for _, n_in, n_out, _ in facts.projections) * act_bytes
    head_grads = (facts.head_params * trainable_dtype) if (dense or not facts.causal) else 0
    # a trained embedding shared with the output layer gets two gradient contributions at the end of backward,
    # which autograd sums into a new tensor: both and their sum are alive beside the finished gradients
    tied_sum = 2 * facts.tied_params * trainable_dtype if dense else 0
    shards = world_size if (train.strategy == "fsdp" and world_size > 1) else 1
    frozen, trainable_bytes, grads, optimizer, head_grads, tied_sum = (
        -(-x // shards) for x in (frozen, trainable_bytes, grads, optimizer, head_grads, tied_sum))
    if world_size > 1 and train.strategy == "fsdp":
        gathered = 2 if train.fsdp_mixed_precision == "bf16" else dtype
        block = facts.block_params * gathered
        if quant.get("bits"):  # packed tensors are gathered as they are stored
            block += sum(packed_bytes(n_in, n_out, quant["bits"], quant["group_size"]) - n_in * n_out * gathered
                         for _, n_in, n_out, _ in facts.projections)
        if METHODS[method].get("flat"):  # MEFT's stack is one FSDP unit: the whole model is gathered for a step
            whole = (frozen + trainable_bytes) * shards
            communication, comm_note = whole - whole // shards, "FSDP: MEFT's one unit, the whole model gathered"
        else:
            communication, comm_note = 2 * block, "FSDP: the current and the prefetched block, gathered"
    elif world_size > 1:
        communication, comm_note = grads, "DDP: gradient buckets (a copy of the gradients for all-reduce)"
    else:
        communication, comm_note = 0, "one process"
    shard_note = f" (1/{shards} each: fsdp)" if shards > 1 else (" (a full replica: ddp)" if world_size > 1 else "")
    if shards > 1 and train.fsdp_cpu_offload and device == "cuda":  # the shards live in host memory between uses
        frozen = trainable_bytes = grads = optimizer = head_grads = tied_sum = 0
        shard_note = " (on the CPU: fsdp_cpu_offload)"
    rows = [PlanRow("weights", frozen, f"frozen base: {weights_format}{shard_note}"),
            PlanRow("trainable", trainable_bytes, f"{trainable:,} parameters{shard_note}"),
            PlanRow("gradients", grads, f"one per trainable parameter{shard_note}"),
            PlanRow("optimizer state", optimizer, f"{train.optimizer}: {state_per} bytes per trainable parameter"
                                                  f"{shard_note}"),
            PlanRow("activations", activations, f"{act_note}; {act_bytes}-byte elements"),
            PlanRow("communication", communication, comm_note)]
    total = frozen + trainable_bytes + optimizer + communication + max(grads + tied_sum, activations + head_grads)
    facts_out = {"model": recipe.model.name, "method": method, "batch": train.batch_size, "seq": seq,
                 "weights_format": weights_format, "strategy": train.strategy, "world_size": world_size,
                 "device": device, "trainable_params": trainable, "head_gradient_bytes": head_grads,
                 "tied_gradient_sum_bytes": tied_sum,
                 "memory_source": memory_source, "layers": facts.layers, "hidden": facts.hidden}
    return Plan(rows=rows, total=total, memory=memory, facts=facts_out)
