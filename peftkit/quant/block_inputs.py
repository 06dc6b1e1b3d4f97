"""What a decoder hands its blocks, captured from the model's own forward so that each block can then be run alone.

Every block's ``forward`` is replaced, for the capture only, by a recorder that keeps the keyword arguments the
decoder passed (rotary position embeddings, position ids, the attention mask *of that block*: Gemma-2 and Qwen2
alternate sliding-window and full-attention masks between blocks) and hands the hidden states on unchanged. No block
computes, so this works on a skeleton whose blocks are still on the meta device, and no family's decoder is rebuilt:
whatever the decoder passes is what each block gets again during calibration.
"""

from __future__ import annotations

import torch

# keys a block gets only for generation (the KV cache) or that change what it returns
DROPPED_KWARGS = ("past_key_values", "past_key_value", "use_cache", "output_attentions", "cache_position")
BATCH = 8  # windows per capture forward


class _Stop(Exception):
    """Raised by the last block's recorder: nothing after the blocks is needed."""


@torch.no_grad()
def capture_decoder_inputs(model, layers, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """(hidden states entering the first block for every window (N, T, d), per block the keyword arguments the
    decoder passes it). The keyword arguments are taken from a forward of one window: their batch dimension
    broadcasts over the windows a block is later run on."""
    layers = list(layers)
    seen: dict = {"hidden": [], "kwargs": [None] * len(layers)}

    def recorder(index: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if len(args) > 1:
                raise ValueError(f"{type(layers[index]).__name__} is called with {len(args) - 1} positional "
                                 f"arguments besides the hidden states; blocks are replayed with keyword arguments only")
            if index == 0:
                seen["hidden"].append(hidden)
            seen["kwargs"][index] = {k: v for k, v in kwargs.items() if k not in DROPPED_KWARGS and k != "hidden_states"}
            if index == len(layers) - 1:
                raise _Stop
            return hidden
        return forward

    for i, block in enumerate(layers):
        block.forward = recorder(i)  # an instance attribute: nn.Module.__call__ finds it before the class's
    try:
        for ids in input_ids.split(BATCH):
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
        hidden = torch.cat(seen["hidden"])
        try:
            model(input_ids=input_ids[:1], use_cache=False)
        except _Stop:
            pass
    finally:
        for block in layers:
            del block.forward
    return hidden, seen["kwargs"]
