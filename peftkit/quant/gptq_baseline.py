"""A GPTQ baseline for the quant bench: GPTQModel's own GPTQ solver on peftkit's calibration windows.

For every decoder block in order, and inside it every group of projections that share an input (q, k, v | o |
gate, up | down for LLaMA) in the order the block calls them, the inputs are collected from the block whose
earlier projections are already quantized (on the inputs that the quantized earlier blocks produce), then GPTQModel's ``GPTQ`` (its ``hf_quantize``, the entry
point transformers/optimum use) solves for the quantized weight: asymmetric, ``group_size`` columns per
group, no activation ordering (desc_act=False), GPTQModel's default damping. This is the walk GPTQModel's
own looper does; running it here feeds GPTQ exactly the windows ApiQ is calibrated on and keeps the
torch/CPU path (no kernel selection, no packing threads).

The stored model is what a GPTQ checkpoint holds: codes as GPTQModel packs them
(clamp(round((Q + zero * scale) / scale), 0, 2^b - 1)), scales cast to fp16, integer zero points. The
result is a QuantResult with r = 0 (GPTQ has no LoRA). gptqmodel is imported only here (about 6 s).
"""

from __future__ import annotations

import copy
import time

import torch

from peftkit.models.families import layers_of
from peftkit.quant.blocks import (
    block_linears,
    block_prefixes,
    capture_block_inputs,
    decoder_family,
    forward_order,
    run_block_batched,
    target_leaf_names,
)
from peftkit.quant.quantized_weight import QuantizedWeight


def gptq_codes(Q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """What GPTQModel packs for a solved weight Q with per-group (out, G) scale and zero."""
    s = scale.float().repeat_interleave(group_size, dim=1)
    z = zero.float().repeat_interleave(group_size, dim=1)
    codes = torch.round((Q.float() + z * s) / s).clamp_(0, 2 ** bits - 1)
    return QuantizedWeight("uniform", bits, group_size, tuple(Q.shape), codes=codes.to(torch.uint8),
                           scales=scale.to(torch.float16).float(), zeros=zero.float())


@torch.no_grad()
def _subsets(block, linears: dict, hidden: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """The projections in call order, grouped by the input tensor they share (q, k, v | o | gate, up | down)."""
    order = forward_order(block, linears, hidden, kwargs)
    inputs: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args):
            # the tensor itself is kept, not its id(): a freed input's id can be reused by a later one
            inputs.setdefault(name, args[0])  # returns None: the input is left as it is
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in linears.items()]
    try:
        run_block_batched(block, hidden[:1], kwargs, 1)
    finally:
        for handle in handles:
            handle.remove()
    subsets: list[list[str]] = []
    for name in order:
        if subsets and name in inputs and inputs[name] is inputs.get(subsets[-1][0]):
            subsets[-1].append(name)
        else:
            subsets.append([name])
    return subsets


@torch.no_grad()
def gptq_quantize(model, calib_ids: torch.Tensor, bits: int, group_size: int, batch_size: int = 4,
                  damp_percent: float | None = None, log=print):
    """QuantResult of GPTQ (r = 0) for every projection Linear of every block of ``model`` (left unchanged)."""
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    from peftkit.quant.pipeline import QuantResult

    fam = decoder_family(model)
    leaves = target_leaf_names(fam)
    def config():
        return QuantizeConfig(bits=bits, group_size=group_size, sym=False, desc_act=False, offload_to_disk=False)

    damp = config().damp_percent if damp_percent is None else damp_percent
    result = QuantResult("gptq", bits, group_size, 0, 1.0, [])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x_q, kwargs = capture_block_inputs(model, calib_ids.to(device))
    prefixes = block_prefixes(model)
    blocks = list(layers_of(model))
    for i, block in enumerate(blocks):
        start = time.perf_counter()
        qblock = copy.deepcopy(block)
        linears = block_linears(qblock, leaves)
        for subset in _subsets(qblock, linears, x_q, kwargs):
            solvers = {name: GPTQ(linears[name], config()) for name in subset}
            handles = []
            for name, solver in solvers.items():
                solver.quantizer.configure(perchannel=True)  # as GPTQModel's own processor configures it
                handles.append(linears[name].register_forward_hook(
                    lambda mod, args, out, s=solver: s.add_batch(args[0].detach(), out)))
            try:  # one pass over the windows feeds every projection of the subset (they share their input)
                run_block_batched(qblock, x_q, kwargs, batch_size)
            finally:
                for handle in handles:
                    handle.remove()
            for name, solver in solvers.items():
                linear = linears[name]
                original = linear.weight.detach().clone()
                scale, zero, _g_idx, *_ = solver.hf_quantize(percdamp=damp, group_size=group_size, actorder=False)
                stored = gptq_codes(linear.weight.detach(), scale, zero, bits, group_size)
                linear.weight.data = linear.weight.data.to(original.dtype)  # Q feeds the next layers, as in GPTQModel
                full = f"{prefixes[i]}.{name}"
                result.weights[full] = stored
                w_hat = stored.dequantize()
                result.layers[full] = {"weight_rel_error": ((w_hat - original).norm() / original.norm()).item()}
            del solvers
        x_q = run_block_batched(qblock, x_q, kwargs, batch_size)
        seconds = time.perf_counter() - start
        result.blocks.append({"index": i, "seconds": round(seconds, 3)})
        log(f"gptq {bits}-bit block {i + 1}/{len(blocks)} ({seconds:.1f} s)")
    model.train(was_training)
    return result
