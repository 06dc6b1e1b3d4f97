"""Quantize a whole decoder block by block, then build the quantized model with its LoRA.

For every block, in order: copy the block, swap its projections for QuantLinears, hand it to the quantizer that
``options.method`` names (``QUANTIZERS``, one file each under peftkit/quant/quantizers/: RTN, NF, LoftQ from the
weights alone; ApiQ-lw/bw and GPTQ calibrated on the cached block inputs), then run the FP block on the FP chain X
and the quantized block on the quantized chain Xq to get the next block's inputs and this block's relative output
error. Each block runs with the keyword arguments the model's own decoder passed it (block_inputs.py). The model
itself stays full precision; ``build_quantized_model`` applies a result to it. ``options.bits`` None quantizes
nothing (every projection kept as it is, LoRA B = 0).
"""

from __future__ import annotations

import copy
import time

import torch

from peftkit.models.families import family_of, layers_of
from peftkit.quant.apiq import CalibReport, CalibSettings
from peftkit.quant.block_inputs import capture_decoder_inputs
from peftkit.quant.blocks import block_prefixes, replace_module, run_block_batched
from peftkit.quant.checks import check_model
from peftkit.quant.qlinear import QuantLinear
from peftkit.quant.quantized_weight import QuantizedWeight
from peftkit.quant.quantizers import BlockWork
from peftkit.quant.result import QuantResult, attach_lora
from peftkit.utils.registry import QUANTIZERS


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def _block_report(index: int, y_fp, y_q, reports: list[CalibReport], seconds: float) -> dict:
    """errors.json entry of one block, plus a one-line 'summary' for the progress log."""
    info: dict = {"index": index}
    summary = ""
    if y_fp is not None:
        info["rel_output_error"] = _rel(y_q, y_fp)
        summary += f": rel. output error {info['rel_output_error']:.4f}"
    losses = [r.epoch_losses for r in reports if r.epoch_losses]
    if losses:
        info["loss_first_epoch"] = sum(l[0] for l in losses)
        info["loss_last_epoch"] = sum(l[-1] for l in losses)
        summary += f", loss {info['loss_first_epoch']:.4g} -> {info['loss_last_epoch']:.4g}"
    info["calibration"] = [r.to_dict() for r in reports]
    info["nan_events"] = [e for r in reports for e in r.nan_events]
    info["seconds"] = round(seconds, 3)
    summary += f" ({seconds:.1f} s)"
    if info["nan_events"]:
        summary += f" [{len(info['nan_events'])} NaN event(s), see errors.json]"
    info["summary"] = summary
    return info


class _LoadedBlocks:
    """The blocks of a model held in memory."""

    def __init__(self, model):
        self.blocks = list(layers_of(model))

    def load(self, i: int):
        return self.blocks[i]

    def release(self, i: int, block, quantized: list[str]) -> None:
        pass


class _DiskBlocks:
    """The blocks of a model skeleton (``load_skeleton``) read from its safetensors files one at a time.

    ``release`` hands a block's quantized Linear weights back to the meta device once the block is done, so
    only the current block's weights are ever in memory; its norms and biases (a few vectors) stay."""

    def __init__(self, model, weights: "SafetensorsIndex"):
        self.blocks, self.prefixes, self.weights = list(layers_of(model)), block_prefixes(model), weights

    def load(self, i: int):
        block = self.blocks[i]
        prefix = self.prefixes[i] + "."
        missing = [n for n, p in block.named_parameters() if p.is_meta]
        block.load_state_dict({n: self.weights.get(prefix + n) for n in missing}, strict=False, assign=True)
        return block

    def release(self, i: int, block, quantized: list[str]) -> None:
        for name in quantized:
            linear = block.get_submodule(name)
            linear.weight = torch.nn.Parameter(linear.weight.to("meta"), requires_grad=False)


def quantize_model(model, options, calib_ids: torch.Tensor | None = None, log=print,
                   weights: "SafetensorsIndex | None" = None) -> QuantResult:
    """Quantize every projection of every block of ``model`` (left unchanged) per ``options``.

    ``options`` carries method, bits, group_size, symmetric, lora_r, lora_alpha, lora_targets,
    loftq_iters, epochs, lr_lora, lr_clip, weight_decay, aug_loss, batch_size, seed (see config.schema.QuantArgs);
    ``lora_r`` 0 = no LoRA.
    ``calib_ids`` (N, T) token windows: required by the calibrated quantizers (ApiQ, GPTQ); with them every
    quantizer also reports the per-block relative output error on those windows.
    ``weights``: when ``model`` is a skeleton from ``load_skeleton`` (blocks on the meta device), the
    checkpoint its blocks are read from, one block at a time; the result is the same as for the loaded model.
    """
    check_model(model, options)
    quantizer = QUANTIZERS.get(options.method)()
    method, bits, group = options.method, options.bits, options.group_size
    if quantizer.calibrated and bits is not None and calib_ids is None:
        raise ValueError(f"{method} needs calibration windows")
    paths = family_of(model).projections
    leaves = [path.rpartition(".")[2] for path in paths]
    lora_leaves = list(options.lora_targets or leaves) if options.lora_r else []
    scaling = options.lora_alpha / options.lora_r if options.lora_r else 1.0
    result = QuantResult(method, bits, group, options.lora_r, options.lora_alpha, lora_leaves)
    settings = CalibSettings(options.epochs, options.lr_lora, options.lr_clip, options.weight_decay,
                             options.aug_loss, options.batch_size, options.seed)
    device = next(p.device for p in model.parameters() if not p.is_meta)
    was_training = model.training
    model.eval()
    x_fp = x_q = None
    block_kwargs = [{} for _ in layers_of(model)]
    if calib_ids is not None:
        x_fp, block_kwargs = capture_decoder_inputs(model, layers_of(model), calib_ids.to(device))
        x_q = x_fp.clone()
    source = _DiskBlocks(model, weights) if weights is not None else _LoadedBlocks(model)
    n_blocks = len(source.blocks)
    prefixes = block_prefixes(model)
    label = f"{method} {bits}-bit" if bits is not None else f"{method} (not quantized)"
    for i in range(n_blocks):
        start = time.perf_counter()
        block = source.load(i)
        kwargs = block_kwargs[i]
        torch.manual_seed(options.seed + i)  # LoRA A init per block: reproducible whatever ran before
        qblock = copy.deepcopy(block)
        qlinears: dict[str, QuantLinear] = {}
        for name in paths:
            r = options.lora_r if name.rpartition(".")[2] in lora_leaves else 0
            qlinears[name] = QuantLinear(qblock.get_submodule(name), bits, group, options.symmetric,
                                         lwc=quantizer.learned_clipping, r=r, scaling=scaling)
            replace_module(qblock, name, qlinears[name])
        y_fp = run_block_batched(block, x_fp, kwargs, options.batch_size) if x_fp is not None else None
        reports: list[CalibReport] = []
        if bits is None:
            stored = {n: q.freeze() for n, q in qlinears.items()}
        else:
            stored, reports = quantizer.quantize_block(BlockWork(i, block, qblock, qlinears, x_fp, x_q, y_fp, kwargs,
                                                                 settings, options))

        y_q = run_block_batched(qblock, x_q, kwargs, options.batch_size) if y_fp is not None else None
        block_info = _block_report(i, y_fp, y_q, reports, time.perf_counter() - start)
        log(f"{label} block {i + 1}/{n_blocks}{block_info.pop('summary')}")
        if y_fp is not None:
            x_fp, x_q = y_fp, y_q
        result.blocks.append(block_info)

        for name, q in qlinears.items():
            full = f"{prefixes[i]}.{name}"
            result.weights[full] = stored[name]
            w_hat = stored[name].dequantize()
            result.layers[full] = {"weight_rel_error": _rel(w_hat, q.weight)}
            own = [r for r in reports if r.where == f"block {i} {name}"]  # ApiQ-lw: this layer's own losses
            if own:
                result.layers[full]["epoch_losses"] = own[0].epoch_losses
            if q.r:
                result.lora[full] = (q.lora_A.detach().clone(), q.lora_B.detach().clone())
        del qblock, qlinears
        source.release(i, block, list(stored))
    model.train(was_training)
    return result


def fill_released_weights(model) -> None:
    """Give every parameter a skeleton left on the meta device one zero scratch tensor per shape (shared), so
    that code which only writes into those weights (``build_quantized_model`` before a checkpoint is saved)
    can run without holding a dense copy of every block. The model computes nothing meaningful afterwards."""
    scratch: dict[tuple, torch.Tensor] = {}
    device = next(p.device for p in model.parameters() if not p.is_meta)
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                shared = scratch.setdefault((tuple(p.shape), p.dtype), torch.zeros(p.shape, dtype=p.dtype, device=device))
                module._parameters[key] = torch.nn.Parameter(shared, requires_grad=False)


@torch.no_grad()
def apply_quantized_weights(model, weights: dict[str, QuantizedWeight]) -> None:
    """Replace each quantized Linear's weight by its dequantized value (in place, fake-quant base)."""
    for name, quantized in weights.items():
        linear = model.get_submodule(name)
        linear.weight.copy_(quantized.dequantize().to(linear.weight.device, linear.weight.dtype))


def build_quantized_model(model, result: QuantResult):
    """Apply ``result`` to ``model`` in place and return it wrapped with the initialised LoRA (peft)."""
    apply_quantized_weights(model, result.weights)
    return attach_lora(model, result.lora_r, result.lora_alpha, result.lora_targets, result.lora)
