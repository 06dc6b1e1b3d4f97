"""The decoder blocks of a model as calibration sees them.

Block inputs are captured once together with the keyword arguments the decoder passes each block
(block_inputs.py), so each block can then be run on its own: calibration never re-runs the whole model per layer.

A model can also be opened as a skeleton (``load_skeleton``): everything outside the blocks is loaded,
the blocks' parameters stay on the meta device and are read from the checkpoint's safetensors files one
block at a time (``SafetensorsIndex``), so quantizing a model never holds more than one block's weights.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.models.families import layers_of

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it captured what it needed."""


def block_prefixes(model) -> list[str]:
    """Full module name of each block (e.g. 'model.layers.3')."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(b)] for b in layers_of(model)]


def replace_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, leaf = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block_batched(block: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_size: int) -> torch.Tensor:
    return torch.cat([run_block(block, h, kwargs) for h in hidden.split(batch_size)])


@torch.no_grad()
def capture_linear_input(block: nn.Module, linear: nn.Module, hidden: torch.Tensor, kwargs: dict,
                         batch_size: int) -> torch.Tensor:
    """The input of ``linear`` inside ``block`` for every window (the block is stopped right there)."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        seen.append(args[0].detach())
        raise _Stop

    handle = linear.register_forward_pre_hook(hook)
    try:
        for h in hidden.split(batch_size):
            try:
                run_block(block, h, kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(seen)


@torch.no_grad()
def capture_linear_inputs(block: nn.Module, linears: dict[str, nn.Module], hidden: torch.Tensor, kwargs: dict,
                          batch_size: int) -> dict[str, torch.Tensor]:
    """The inputs of all ``linears`` inside ``block`` for every window, in one pass over the block."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0].detach()))
               for name, m in linears.items()]
    try:
        for h in hidden.split(batch_size):
            run_block(block, h, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in seen.items()}


@torch.no_grad()
def forward_order(block: nn.Module, linears: dict[str, nn.Module], hidden: torch.Tensor, kwargs: dict) -> list[str]:
    """Names of ``linears`` in the order the block calls them (q, k, v, o, gate, up, down for LLaMA)."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name) if name not in order else None)
               for name, m in linears.items()]
    try:
        run_block(block, hidden[:1], kwargs)
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in linears if n not in order]


class SafetensorsIndex:
    """Tensor name -> file of a model directory's safetensors weights; tensors are read one at a time."""

    def __init__(self, directory, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        import json
        from pathlib import Path

        from safetensors import safe_open

        directory = Path(directory)
        if (directory / SAFE_WEIGHTS).is_file():
            files = [directory / SAFE_WEIGHTS]
        else:
            files = sorted({directory / f for f in json.loads((directory / SAFE_INDEX).read_text())["weight_map"].values()})
        self.dtype, self.device, self.files, self.where = dtype, torch.device(device), files, {}
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                self.where.update({key: f for key in handle.keys()})

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.where[key]), framework="pt") as handle:
            return handle.get_tensor(key).to(self.device, self.dtype)


def load_skeleton(directory, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, SafetensorsIndex): a causal LM from ``directory`` whose decoder blocks have their parameters
    on the meta device; everything else (embeddings, final norm, head, rotary buffers) is loaded. None when
    the checkpoint's tensor names are not the model's own (then load the model whole)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights():  # parameters on meta; buffers (rotary inv_freq) computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights = SafetensorsIndex(directory, dtype, device)
    in_blocks = {id(p) for b in layers_of(model) for p in b.parameters()}
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in in_blocks]
    block_names = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in in_blocks]
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        output = model.get_output_embeddings()
        tied = {n for n, p in model.named_parameters(remove_duplicate=False)
                if output is not None and p is output.weight and n not in weights}
    if any(n not in weights for n in block_names) or any(n not in weights for n in names if n not in tied):
        return None
    model.load_state_dict({n: weights.get(n) for n in names if n not in tied}, strict=False, assign=True)
    if tied:
        model.tie_weights()
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(weights.device)
    return model.eval(), weights
