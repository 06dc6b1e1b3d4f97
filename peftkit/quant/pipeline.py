"""Quantize a whole decoder block by block, then build the quantized model with its LoRA.

For every block, in order: copy the block, swap its projection Linears for QuantLinears, quantize
them with the chosen method (RTN, NF, LoftQ: from the weights alone; ApiQ-lw/bw: calibrated on the
cached block inputs), then run the FP block on the FP chain X and the quantized block on the
quantized chain Xq to get the next block's inputs and this block's relative output error.
The model itself stays full precision; ``build_quantized_model`` applies a result to it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from peftkit.models.families import layers_of
from peftkit.quant.apiq import (
    CalibReport,
    CalibSettings,
    calibrate_block,
    calibrate_linear,
)
from peftkit.quant.blocks import (
    block_linears,
    block_prefixes,
    capture_block_inputs,
    capture_linear_inputs,
    decoder_family,
    forward_order,
    replace_module,
    run_block_batched,
    target_leaf_names,
)
from peftkit.quant.loftq import loftq_init
from peftkit.quant.normal_float import nf_quantize
from peftkit.quant.qlinear import QuantLinear
from peftkit.quant.quantized_weight import QuantizedWeight

CALIBRATED = ("apiq-lw", "apiq-bw")


@dataclass
class QuantResult:
    """Everything a quantized checkpoint holds, keyed by full module name (e.g. model.layers.0.mlp.up_proj)."""

    method: str
    bits: int
    group_size: int
    lora_r: int
    lora_alpha: float
    lora_targets: list[str]
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (A, B)
    blocks: list[dict] = field(default_factory=list)
    layers: dict[str, dict] = field(default_factory=dict)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def _quantize_from_weights(q: QuantLinear, method: str, bits: int, group_size: int, loftq_iters: int) -> QuantizedWeight:
    """RTN / NF (QLoRA start) / LoftQ: no data needed. B stays 0 except for LoftQ."""
    if bits >= 16:
        return q.freeze()
    if method == "rtn":
        return q.freeze()  # lwc is off: export() is plain min/max RTN
    if method == "nf":
        codes, absmax = nf_quantize(q.weight, bits, group_size)
        return q.freeze(QuantizedWeight("nf", bits, group_size, tuple(q.weight.shape), codes=codes, scales=absmax))
    if method == "loftq":
        quantized, A, B = loftq_init(q.weight, bits, group_size, max(q.r, 1), q.scaling, loftq_iters)
        if q.r:
            with torch.no_grad():
                q.lora_A.copy_(A)
                q.lora_B.copy_(B)
        return q.freeze(quantized)
    raise ValueError(f"unknown quantization method {method!r}")


def _calibrate_block_bw(qblock, qlinears, x_q, y_fp, kwargs, settings: CalibSettings, index: int) -> CalibReport:
    """ApiQ-bw on one block; the aug target F(Xq; W) is the same block with every QuantLinear in FP mode."""
    y_aug = None
    if settings.aug_loss:
        for q in qlinears.values():
            q.fp_mode = True
        y_aug = run_block_batched(qblock, x_q, kwargs, settings.batch_size)
        for q in qlinears.values():
            q.fp_mode = False
    return calibrate_block(qblock, qlinears, x_q, y_fp, y_aug, kwargs, settings, f"block {index}")


def _calibrate_block_lw(block, qblock, qlinears, x_fp, x_q, kwargs, settings: CalibSettings, index: int):
    """ApiQ-lw on the Linears of one block in forward order, each frozen before the next is calibrated."""
    fp_inputs = capture_linear_inputs(block, {n: block.get_submodule(n) for n in qlinears}, x_fp, kwargs,
                                      settings.batch_size)
    stored, reports = {}, []
    for name in forward_order(qblock, qlinears, x_q, kwargs):
        reports.append(calibrate_linear(qblock, qlinears[name], fp_inputs.pop(name), x_q, kwargs, settings,
                                        f"block {index} {name}"))
        stored[name] = qlinears[name].freeze()
    return stored, reports


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
    """Quantize every projection Linear of every block of ``model`` (left unchanged) per ``options``.

    ``options`` carries method, bits, group_size, symmetric, lora_r, lora_alpha, lora_targets,
    loftq_iters, epochs, lr_lora, lr_clip, weight_decay, aug_loss, batch_size, seed (see recipe.QuantOptions).
    ``calib_ids`` (N, T) token windows: required by ApiQ; with them every method also reports the
    per-block relative output error on those windows.
    ``weights``: when ``model`` is a skeleton from ``load_skeleton`` (blocks on the meta device), the
    checkpoint its blocks are read from, one block at a time; the result is the same as for the loaded model.
    """
    fam = decoder_family(model)
    method, bits, group = options.method, options.bits, options.group_size
    if method in CALIBRATED and bits < 16 and calib_ids is None:
        raise ValueError(f"{method} needs calibration windows")
    leaves = target_leaf_names(fam)
    lora_leaves = list(options.lora_targets or leaves)
    scaling = options.lora_alpha / options.lora_r
    result = QuantResult(method, bits, group, options.lora_r, options.lora_alpha, lora_leaves)
    settings = CalibSettings(options.epochs, options.lr_lora, options.lr_clip, options.weight_decay,
                             options.aug_loss, options.batch_size, options.seed)
    device = next(p.device for p in model.parameters() if not p.is_meta)
    was_training = model.training
    model.eval()
    x_fp = x_q = kwargs = None
    if calib_ids is not None:
        x_fp, kwargs = capture_block_inputs(model, calib_ids.to(device))
        x_q = x_fp.clone()
    source = _DiskBlocks(model, weights) if weights is not None else _LoadedBlocks(model)
    n_blocks = len(source.blocks)
    prefixes = block_prefixes(model)
    for i in range(n_blocks):
        start = time.perf_counter()
        block = source.load(i)
        torch.manual_seed(options.seed + i)  # LoRA A init per block: reproducible whatever ran before
        qblock = copy.deepcopy(block)
        qlinears: dict[str, QuantLinear] = {}
        for name, linear in block_linears(qblock, leaves).items():
            leaf = name.split(".")[-1]
            r = options.lora_r if leaf in lora_leaves else 0
            qlinears[name] = QuantLinear(linear, bits, group, options.symmetric, lwc=method in CALIBRATED, r=r, scaling=scaling)
            replace_module(qblock, name, qlinears[name])
        y_fp = run_block_batched(block, x_fp, kwargs, options.batch_size) if x_fp is not None else None
        reports: list[CalibReport] = []
        if method == "apiq-bw" and bits < 16:
            reports.append(_calibrate_block_bw(qblock, qlinears, x_q, y_fp, kwargs, settings, i))
            stored = {n: q.freeze() for n, q in qlinears.items()}
        elif method == "apiq-lw" and bits < 16:
            stored, reports = _calibrate_block_lw(block, qblock, qlinears, x_fp, x_q, kwargs, settings, i)
        else:
            stored = {n: _quantize_from_weights(q, method, bits, group, options.loftq_iters) for n, q in qlinears.items()}

        y_q = run_block_batched(qblock, x_q, kwargs, options.batch_size) if y_fp is not None else None
        block_info = _block_report(i, y_fp, y_q, reports, time.perf_counter() - start)
        log(f"{method} {bits}-bit block {i + 1}/{n_blocks}{block_info.pop('summary')}")
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


def lora_config(r: int, alpha: float, targets: list[str], heads: list[str] | None = None, dropout: float = 0.0):
    """The peft LoraConfig of a quantized model (task heads, if any, train in full and are saved)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      modules_to_save=heads or None, exclude_modules=heads or None)


@torch.no_grad()
def attach_lora(model, r: int, alpha: float, targets: list[str], lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
                heads: list[str] | None = None):
    """Wrap ``model`` with peft LoRA and set each adapted module's A and B (missing ones keep B = 0)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(r, alpha, targets, heads))
    for name, module in peft_model.base_model.model.named_modules():
        if name in lora and hasattr(module, "lora_A"):
            A, B = lora[name]
            module.lora_A["default"].weight.copy_(A)
            module.lora_B["default"].weight.copy_(B)
    return peft_model


def build_quantized_model(model, result: QuantResult):
    """Apply ``result`` to ``model`` in place and return it wrapped with the initialised LoRA (peft)."""
    apply_quantized_weights(model, result.weights)
    return attach_lora(model, result.lora_r, result.lora_alpha, result.lora_targets, result.lora)
