"""Fold a LoRA trained on a low-bit base back into low-bit weights: a quantized model with no adapter.

The target is the unmerged model, whose adapted projections compute with W' = dequant(W) + s * B A. Each block is
re-quantized to the base's bits and group size (and storage: GPTQ-packed uniform codes, or NF4) and written as a
plain quantized checkpoint. Two ways:

* ``naive``: every W' rounded back onto the base's own grid (its scales and zero points, or its NF absmax): the
  merge a packed format allows without looking at any data. A LoRA update smaller than half a step leaves the codes
  as they were, so at 2 and 3 bits most of the fine-tune is rounded away.
* ``calibrated``: blocks are walked in order, as ``peftkit quantize`` walks them. The unmerged block runs on the
  unmerged chain's inputs (the target outputs F(X; W')), the re-quantized block on the merged chain's inputs Xq
  (earlier blocks already merged), and candidate quantizations of the block's W' are compared by how well
  F(Xq; W'_q) reproduces F(X; W') on the calibration windows:
    uniform codes: the naive grid, fresh min/max rounding, GPTQ's error-compensating solver on Xq (asymmetric
                   bases), optionally learned clipping (ApiQ's LWC, per-group clipping logits trained on the block's
                   output error; not tried by default);
    NF4:           the naive grid, a fresh absmax, and a per-group absmax shrink chosen from a few ratios by the
                   input-weighted weight error sum_j E[x_j^2] (w_j - q_j)^2;
  and then learned rounding on the grid of the best of those: V = W' + u * step, rounded onto that grid with a
  straight-through gradient, u trained by Adam on the block's output error (AdaRound's question: which grid point
  each weight goes to). The block keeps the candidate with the smallest output error, so on the calibration
  windows no block is worse than the naive merge; its outputs (computed with the weights exactly as stored) are the
  next block's inputs.

Projections without a LoRA keep their codes. Everything else (embeddings, norms, the head) is taken from the base
unchanged, so the merged model stores exactly as many bytes as its base.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from peftkit.quant.apiq import CalibSettings, calibrate_block
from peftkit.quant.block_inputs import capture_decoder_inputs
from peftkit.quant.blocks import block_prefixes, capture_linear_inputs, replace_module, run_block_batched
from peftkit.quant.normal_float import nf_levels
from peftkit.quant.packed_linear import PackedLinear
from peftkit.quant.qlinear import QuantLinear
from peftkit.quant.quantized_weight import QuantizedWeight
from peftkit.quant.uniform import grouped, rtn_quantize

MODES = ("calibrated", "naive")
NF_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # absmax ratios tried per NF group


@dataclass
class MergeSettings:
    """How the calibrated merge searches (the naive merge uses none of it)."""

    mode: str = "calibrated"
    epochs: int = 2  # learned clipping: passes over the windows per block
    lr_clip: float = 5e-2
    lr_round: float = 2e-2  # learned rounding: Adam on offsets measured in grid steps
    batch_size: int = 1
    seed: int = 0
    candidates: tuple[str, ...] | None = None  # None: every candidate the base's codes have
    tune_epochs: int = 4  # end-to-end tuning of the merged scales and norms (0: block by block only)
    tune_lr: float | None = None  # Adam on the scales' log gains and the norm weights, decayed linearly to zero;
    # None: tune_lr_for(bits)
    tune_norms: bool = True


@dataclass
class MergeResult:
    """The merged weights (full module name -> what is stored) and what each block chose."""

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint tensors replaced as they are (norms)
    blocks: list[dict] = field(default_factory=list)
    tuning: dict | None = None  # what the end-to-end stage did (tune_end_to_end's report)
    seconds: float = 0.0

    def blocks_chosen(self) -> dict[str, int]:
        """How many blocks kept each candidate."""
        counts: dict[str, int] = {}
        for block in self.blocks:
            counts[block["chosen"]] = counts.get(block["chosen"], 0) + 1
        return counts


def tune_lr_for(bits: int) -> float:
    """The end-to-end tuning's default learning rate. Measured on smollm2-135m (docs/results/merge-smollm2-*bit):
    at 4 bits 1e-3 tuned well and 3e-3 hardly lowered the held-out KL; at 2 bits, where the block-wise merge is far
    off, 3e-3 got to 1.12x the unmerged perplexity against 1.39x at 1e-3. 3 bits was not measured and takes the
    low-bit rate."""
    return 1e-3 if bits >= 4 else 3e-3


def lora_delta(module) -> torch.Tensor:
    """s * B A summed over the active adapters of a peft LoRA layer, float32 (out, in)."""
    delta = None
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        A, B = module.lora_A[adapter].weight.float(), module.lora_B[adapter].weight.float()
        term = (B @ A) * module.scaling[adapter]
        delta = term if delta is None else delta + term
    return delta


def base_quantized(packed: PackedLinear) -> QuantizedWeight:
    """The codes, scales and zero points (or NF absmax) a PackedLinear holds."""
    from peftkit.quant.gptq_format import from_gptq
    from peftkit.quant.packing import unpack_codes

    shape = (packed.out_features, packed.in_features)
    if packed.kind == "gptq":
        codes, scales, zeros = from_gptq({k: getattr(packed, k) for k in ("qweight", "qzeros", "scales")}, packed.bits)
        return QuantizedWeight("uniform", packed.bits, packed.group_size, shape, codes=codes.to(torch.uint8),
                               scales=scales.float(), zeros=zeros.float())
    codes = unpack_codes(packed.qweight, packed.bits, shape)
    return QuantizedWeight("nf", packed.bits, packed.group_size, shape, codes=codes, scales=packed.absmax.float())


def stored_weight(quantized: QuantizedWeight) -> torch.Tensor:
    """W as the written checkpoint computes it (GPTQ: the float16 product its kernels form), float32."""
    return PackedLinear.from_quantized(quantized).unpack(torch.float32)


# ---- the candidates ----------------------------------------------------------------------------------------

def on_grid(weight: torch.Tensor, base: QuantizedWeight) -> QuantizedWeight:
    """``weight`` rounded onto ``base``'s grid: its scales and zero points (uniform) or its absmax (NF)."""
    with torch.no_grad():
        groups = grouped(weight.float(), base.group_size)
        if base.kind == "uniform":
            scale, zero = base.scales.float(), base.zeros.float()
            codes = (groups / scale[..., None]).round().add(zero[..., None]).clamp(0, 2 ** base.bits - 1)
            return QuantizedWeight("uniform", base.bits, base.group_size, base.shape,
                                   codes=codes.reshape(base.shape).to(torch.uint8), scales=scale, zeros=zero)
        codes = _nf_codes(groups, base.scales.float(), base.bits)
        return QuantizedWeight("nf", base.bits, base.group_size, base.shape, codes=codes.reshape(base.shape),
                               scales=base.scales.float())


def _nf_codes(groups: torch.Tensor, absmax: torch.Tensor, bits: int) -> torch.Tensor:
    levels = nf_levels(bits, groups.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(groups / absmax[..., None], midpoints).to(torch.uint8)


def fresh_rtn(weight: torch.Tensor, base: QuantizedWeight, symmetric: bool) -> QuantizedWeight:
    """Min/max round-to-nearest of ``weight`` (uniform) or a fresh absmax (NF), at the base's bits and groups."""
    if base.kind == "uniform":
        codes, scale, zero = rtn_quantize(weight.float(), base.bits, base.group_size, symmetric)
        return QuantizedWeight("uniform", base.bits, base.group_size, base.shape, codes=codes, scales=scale, zeros=zero)
    return nf_shrunk(weight, base, torch.ones(1))


def nf_shrunk(weight: torch.Tensor, base: QuantizedWeight, importance: torch.Tensor,
              ratios: tuple[float, ...] = (1.0,)) -> QuantizedWeight:
    """NF codes of ``weight`` with each group's absmax shrunk by the ratio (of ``ratios``) that minimises
    sum_j importance_j * (w_j - q_j)^2 over the group (``importance``: E[x_j^2] of the layer's input, (in,))."""
    with torch.no_grad():
        groups = grouped(weight.float(), base.group_size)
        absmax = groups.abs().amax(dim=-1).clamp(min=1e-12)
        levels = nf_levels(base.bits, weight.device)
        weights = grouped(importance.float().expand(weight.shape[1])[None], base.group_size)  # (1, n, g)
        best_err = best_scale = None
        for ratio in ratios:
            scale = (absmax * ratio).float()
            codes = _nf_codes(groups, scale, base.bits)
            err = ((levels[codes.long()] * scale[..., None] - groups) ** 2 * weights).sum(dim=-1)
            if best_err is None:
                best_err, best_scale = err, scale
            else:
                better = err < best_err
                best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
        codes = _nf_codes(groups, best_scale, base.bits)
    return QuantizedWeight("nf", base.bits, base.group_size, base.shape, codes=codes.reshape(base.shape),
                           scales=best_scale)


# ---- one block ---------------------------------------------------------------------------------------------

def _adapted(block) -> dict[str, torch.nn.Module]:
    """path inside the block -> peft LoRA layer whose base is a PackedLinear."""
    return {name: m for name, m in block.named_modules()
            if isinstance(getattr(m, "base_layer", None), PackedLinear) and hasattr(m, "lora_A")}


def _with_quantlinears(block, adapted: dict, merged: dict[str, torch.Tensor], bits: int, group: int,
                       symmetric: bool, lwc: bool) -> tuple[torch.nn.Module, dict[str, QuantLinear]]:
    """A copy of ``block`` whose adapted layers are QuantLinears (no LoRA) over float Linears holding W' and the bias;
    only their clipping logits (with ``lwc``) can train."""
    qblock = copy.deepcopy(block)
    qlinears = {}
    for name, module in adapted.items():
        packed = module.base_layer
        linear = torch.nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(merged[name])
            if packed.bias is not None:
                linear.bias.copy_(packed.bias.float())
        q = QuantLinear(linear, bits, group, symmetric, lwc=lwc, r=0)
        replace_module(qblock, name, q)
        qlinears[name] = q
    for p in qblock.parameters():
        p.requires_grad_(False)
    for q in qlinears.values():
        for p in q.clip_parameters():
            p.requires_grad_(True)
    return qblock, qlinears


def _output_error(qblock, qlinears, candidate: dict[str, QuantizedWeight], x_q, y_target, kwargs, batch_size):
    for name, q in qlinears.items():
        q.fixed_weight = stored_weight(candidate[name])
    out = run_block_batched(qblock, x_q, kwargs, batch_size)
    return ((out - y_target).norm() / y_target.norm().clamp(min=1e-12)).item(), out


def _gptq_candidate(block, adapted, merged, base, x_q, kwargs, settings) -> dict[str, QuantizedWeight]:
    """GPTQModel's solver (the registered ``gptq`` quantizer) on W' with the merged chain's inputs."""
    from types import SimpleNamespace

    from peftkit.quant.quantizers import BlockWork
    from peftkit.utils.registry import QUANTIZERS

    qblock, qlinears = _with_quantlinears(block, adapted, merged, base.bits, base.group_size, False, lwc=False)
    options = SimpleNamespace(bits=base.bits, group_size=base.group_size, damp_percent=None)
    calib = CalibSettings(batch_size=settings.batch_size, seed=settings.seed)
    stored, _ = QUANTIZERS.get("gptq")().quantize_block(BlockWork(0, block, qblock, qlinears, None, x_q, None, kwargs,
                                                                  calib, options))
    return stored


def _clip_candidate(block, adapted, merged, base, symmetric, x_q, y_target, kwargs, settings, where):
    """Learned clipping (ApiQ's LWC, no LoRA) trained on the block's output error against the unmerged block."""
    qblock, qlinears = _with_quantlinears(block, adapted, merged, base.bits, base.group_size, symmetric, lwc=True)
    for q in qlinears.values():  # the aug target of ApiQ-bw: the same block in full precision on Xq
        q.fp_mode = True
    y_aug = run_block_batched(qblock, x_q, kwargs, settings.batch_size)
    for q in qlinears.values():
        q.fp_mode = False
    calib = CalibSettings(epochs=settings.epochs, lr_lora=0.0, lr_clip=settings.lr_clip, aug_loss=True,
                          batch_size=settings.batch_size, seed=settings.seed)
    with torch.enable_grad():
        report = calibrate_block(qblock, qlinears, x_q, y_target, y_aug, kwargs, calib, where)
    return {name: q.export() for name, q in qlinears.items()}, report


def _nf_clip_candidate(qblock, qlinears, adapted, merged, base_of, x_q, kwargs, batch_size):
    inputs = capture_linear_inputs(qblock, qlinears, x_q, kwargs, batch_size)
    return {name: nf_shrunk(merged[name], base_of[name], inputs[name].float().pow(2).mean(dim=(0, 1)), NF_SHRINK)
            for name in adapted}


class _LearnedRounding(torch.nn.Module):
    """A Linear whose weight is V = W' + u * step rounded onto a fixed grid (the grid of a chosen candidate: its
    scales and zero points, or its NF absmax), straight-through: training u decides, weight by weight, which grid
    point W' goes to (AdaRound's question, answered by the block's output error)."""

    def __init__(self, target: torch.Tensor, grid: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.grid, self.bias = grid, bias
        self.register_buffer("target", target.float())
        scales = grid.scales.float().repeat_interleave(grid.group_size, dim=1)
        self.register_buffer("scales", scales)
        if grid.kind == "uniform":
            self.register_buffer("zeros", grid.zeros.float().repeat_interleave(grid.group_size, dim=1))
            self.register_buffer("step", scales)
        else:
            levels = nf_levels(grid.bits, target.device)
            self.register_buffer("levels", levels)
            self.register_buffer("midpoints", (levels[1:] + levels[:-1]) / 2)
            self.register_buffer("step", scales * (levels[1:] - levels[:-1]).mean())
        self.offset = torch.nn.Parameter(torch.zeros_like(self.target))

    def _codes(self, v: torch.Tensor) -> torch.Tensor:
        if self.grid.kind == "uniform":
            return (v / self.scales).round().add(self.zeros).clamp(0, 2 ** self.grid.bits - 1)
        return torch.bucketize(v / self.scales, self.midpoints)

    def _value(self, codes: torch.Tensor) -> torch.Tensor:
        if self.grid.kind == "uniform":
            return (codes - self.zeros) * self.scales
        return self.levels[codes] * self.scales

    def forward(self, x):
        v = self.target + self.offset * self.step
        with torch.no_grad():
            rounded = self._value(self._codes(v))
        return torch.nn.functional.linear(x, v + (rounded - v).detach(), self.bias)

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        codes = self._codes(self.target + self.offset * self.step)
        g = self.grid
        return QuantizedWeight(g.kind, g.bits, g.group_size, g.shape, codes=codes.to(torch.uint8), scales=g.scales,
                               zeros=g.zeros)


def _rounding_candidate(block, adapted, merged, grid: dict[str, QuantizedWeight], x_q, y_target, kwargs,
                        settings, where):
    """Learned rounding of W' on the grids of ``grid``, trained on the block's output error (Adam on the offsets)."""
    import torch.nn.functional as F

    from peftkit.quant.apiq import CalibReport, _optimize
    from peftkit.quant.blocks import run_block

    qblock = copy.deepcopy(block)
    rounders = {}
    for name, module in adapted.items():
        bias = None if module.base_layer.bias is None else module.base_layer.bias.float()
        # starts from W' itself on that grid (rounded to nearest): starting from the candidate's own codes, every
        # weight sits half a step from a flip, and Adam's equal-sized steps flip them all at once (smollm2: the
        # block's error rose sixfold in the second epoch)
        rounders[name] = _LearnedRounding(merged[name], grid[name], bias)
        replace_module(qblock, name, rounders[name])
    for p in qblock.parameters():
        p.requires_grad_(False)
    offsets = [r.offset for r in rounders.values()]
    for p in offsets:
        p.requires_grad_(True)
    batches = list(range(0, x_q.shape[0], settings.batch_size))
    optimizer = torch.optim.Adam(offsets, lr=settings.lr_round)
    generator = torch.Generator().manual_seed(settings.seed)
    losses = []
    with torch.enable_grad():
        for _ in range(settings.epochs):
            total = 0.0
            for b in torch.randperm(len(batches), generator=generator).tolist():
                sl = slice(batches[b], batches[b] + settings.batch_size)
                loss = F.mse_loss(run_block(qblock, x_q[sl], kwargs), y_target[sl])
                if not torch.isfinite(loss):  # the candidate is dropped; the others stand
                    return None, losses
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
            losses.append(total / len(batches))
    return {name: r.export() for name, r in rounders.items()}, losses


def candidate_names(kind: str, symmetric: bool) -> tuple[str, ...]:
    """The candidates a calibrated merge tries by default. Learned clipping on uniform codes ("clip") is left out:
    on the tiny test models and smollm2 it cost as much as learned rounding and did not beat it (name it in
    ``MergeSettings.candidates`` to try it); NF's clip is a cheap search."""
    if kind == "nf":
        return ("naive", "fresh", "clip", "round")
    return ("naive", "fresh") + (() if symmetric else ("gptq",)) + ("round",)


@torch.no_grad()
def merge_block(block, x_t, x_q, kwargs, settings: MergeSettings, symmetric: bool, where: str):
    """(path -> merged QuantizedWeight, the block's report, target outputs, merged outputs) for one block."""
    adapted = _adapted(block)
    y_target = run_block_batched(block, x_t, kwargs, settings.batch_size)
    merged, base_of = {}, {}
    for name, module in adapted.items():
        base_of[name] = base_quantized(module.base_layer)
        delta = lora_delta(module)
        merged[name] = module.base_layer.unpack(torch.float32) + (0 if delta is None else delta)
    if not adapted:
        out = run_block_batched(block, x_q, kwargs, settings.batch_size)
        return {}, {"candidates": {}, "chosen": None}, y_target, out
    kind = next(iter(base_of.values())).kind
    naive = {name: on_grid(merged[name], base_of[name]) for name in adapted}
    if settings.mode == "naive":
        candidates = {"naive": naive}
        wanted = ("naive",)
    else:
        wanted = settings.candidates or candidate_names(kind, symmetric)
        candidates = {"naive": naive}
        if "fresh" in wanted:
            candidates["fresh"] = {name: fresh_rtn(merged[name], base_of[name], symmetric) for name in adapted}
    # one evaluation copy: every candidate's stored weights are set into it in turn
    bits, group = base_of[next(iter(adapted))].bits, base_of[next(iter(adapted))].group_size
    qblock, qlinears = _with_quantlinears(block, adapted, merged, bits, group, symmetric, lwc=False)
    report: dict = {"candidates": {}}
    if settings.mode == "calibrated":
        if kind == "nf" and "clip" in wanted:
            for name, q in qlinears.items():  # the inputs each projection sees with the earlier ones rounded afresh
                q.fixed_weight = stored_weight(candidates.get("fresh", naive)[name])
            candidates["clip"] = _nf_clip_candidate(qblock, qlinears, adapted, merged, base_of, x_q, kwargs,
                                                    settings.batch_size)
        if kind == "uniform" and "gptq" in wanted and not symmetric:
            candidates["gptq"] = _gptq_candidate(block, adapted, merged, base_of[next(iter(adapted))], x_q, kwargs,
                                                 settings)
        if kind == "uniform" and "clip" in wanted:
            clipped, calib = _clip_candidate(block, adapted, merged, base_of[next(iter(adapted))], symmetric, x_q,
                                             y_target, kwargs, settings, where)
            candidates["clip"] = clipped
            report["clip_losses"] = calib.epoch_losses
            if calib.nan_events:
                report["nan_events"] = calib.nan_events
    best = None
    for label, candidate in candidates.items():
        error, out = _output_error(qblock, qlinears, candidate, x_q, y_target, kwargs, settings.batch_size)
        report["candidates"][label] = error
        if best is None or error < best[1]:
            best = (label, error, out)
    if settings.mode == "calibrated" and "round" in wanted:  # refines the best grid found so far
        rounded, losses = _rounding_candidate(block, adapted, merged, candidates[best[0]], x_q, y_target, kwargs,
                                              settings, where)
        report["round_losses"] = losses
        if rounded is not None:
            candidates["round"] = rounded
            error, out = _output_error(qblock, qlinears, rounded, x_q, y_target, kwargs, settings.batch_size)
            report["candidates"]["round"] = error
            if error < best[1]:
                best = ("round", error, out)
    report["chosen"], report["rel_output_error"] = best[0], best[1]
    return candidates[best[0]], report, y_target, best[2]


def merge_lowbit(model, calib_ids: torch.Tensor, settings: MergeSettings, symmetric: bool = False,
                 log=print, tune_ids: torch.Tensor | None = None, check_ids: torch.Tensor | None = None) -> MergeResult:
    """Merge the LoRA of ``model`` (a peft model on a packed base, as ``peftkit.methods.apiq`` loads it) into
    low-bit weights, block by block (module docstring); a calibrated merge given ``tune_ids`` and ``check_ids``
    then tunes its scales and norms end to end (``tune_end_to_end``). ``model`` is left unchanged."""
    from peftkit.models.families import layers_of

    if settings.mode not in MODES:
        raise ValueError(f"merge mode {settings.mode!r} is not one of {MODES}")
    start = time.perf_counter()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = inner.training
    inner.eval()
    layers = list(layers_of(inner))
    prefixes = block_prefixes(inner)
    device = next(p.device for p in inner.parameters())
    x_t, block_kwargs = capture_decoder_inputs(inner, layers, calib_ids.to(device))
    x_q = x_t.clone()
    result = MergeResult()
    for i, block in enumerate(layers):
        tick = time.perf_counter()
        torch.manual_seed(settings.seed + i)
        stored, report, y_t, y_q = merge_block(block, x_t, x_q, block_kwargs[i], settings, symmetric, f"block {i}")
        for name, quantized in stored.items():
            result.weights[f"{prefixes[i]}.{name}"] = quantized
        report = {"index": i, **report, "seconds": round(time.perf_counter() - tick, 3)}
        result.blocks.append(report)
        errors = ", ".join(f"{k} {v:.4f}" for k, v in report["candidates"].items())
        log(f"merge ({settings.mode}) block {i + 1}/{len(layers)}: {report['chosen']} ({errors}; "
            f"{report['seconds']:.1f} s)")
        x_t, x_q = y_t, y_q
    inner.train(was_training)
    if settings.mode == "calibrated" and settings.tune_epochs > 0 and tune_ids is not None and result.weights:
        result.tuning = tune_end_to_end(model, result, tune_ids, check_ids, settings, log)
    result.seconds = time.perf_counter() - start
    return result


# ---- end to end: the merged scales and norms against the unmerged model's next-token distributions -------------

class _ScaledCodes(torch.nn.Module):
    """A merged projection with its codes fixed and its per-group scales trainable: W = values(codes) * scales,
    the scales as s0 * exp(gain) (a gain of 0 is the block-wise result; a multiplicative step keeps every scale's
    sign and treats small and large groups alike)."""

    def __init__(self, quantized: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.quantized = quantized
        codes = quantized.codes
        g = quantized.group_size
        if quantized.kind == "uniform":
            values = codes.float() - quantized.zeros.float().repeat_interleave(g, dim=1)
        else:
            values = nf_levels(quantized.bits, codes.device)[codes.long()]
        self.register_buffer("values", values)
        self.register_buffer("scales0", quantized.scales.float())
        self.bias = None if bias is None else bias.detach().float()
        self.gain = torch.nn.Parameter(torch.zeros_like(self.scales0))

    def scales(self) -> torch.Tensor:
        return self.scales0 * self.gain.exp()

    def forward(self, x):
        weight = self.values * self.scales().repeat_interleave(self.quantized.group_size, dim=1)
        return torch.nn.functional.linear(x, weight, self.bias)

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        q = self.quantized
        scales = self.scales().to(q.scales.dtype)
        return QuantizedWeight(q.kind, q.bits, q.group_size, q.shape, codes=q.codes, scales=scales, zeros=q.zeros)


def _next_token_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per predicted token, averaged."""
    logp = torch.log_softmax(student_logits.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - logp)).sum(dim=-1).mean()


def tune_end_to_end(model, result: MergeResult, tune_ids: torch.Tensor, check_ids: torch.Tensor,
                    settings: MergeSettings, log=print) -> dict:
    """Tune the merged projections' scales (codes and zero points fixed) and, with ``settings.tune_norms``, the
    norm weights, end to end, so that the merged model's next-token distributions match the unmerged model's on
    ``tune_ids`` (KL, one window per step, Adam). Block by block, each block only matched its own outputs and
    inherited every earlier block's error; here every scale answers to the model's output. The codes, bits,
    group size and storage do not change, so the merged model's bytes do not either. After each epoch the KL on
    ``check_ids`` (windows the tuning does not see) is measured; ``result`` takes the epoch with the lowest one,
    or nothing if no epoch beat the block-wise merge."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = inner.training
    inner.eval()
    student = copy.deepcopy(inner)
    tuned = {}
    for name, quantized in result.weights.items():
        lora_layer = student.get_submodule(name)
        base = getattr(lora_layer, "base_layer", lora_layer)
        tuned[name] = _ScaledCodes(quantized, base.bias)
        replace_module(student, name, tuned[name])
    for p in student.parameters():
        p.requires_grad_(False)
    gains = [m.gain for m in tuned.values()]
    # the norms' weights are stored in float beside the codes: tuning them changes no byte count either
    norm_weights = {f"{name}.weight": m.weight for name, m in student.named_modules()
                    if settings.tune_norms and type(m).__name__.endswith("Norm")
                    and isinstance(getattr(m, "weight", None), torch.nn.Parameter)}
    for p in gains + list(norm_weights.values()):
        p.requires_grad_(True)

    def teacher_logp(ids):
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=ids[None], use_cache=False).logits[0].float(), dim=-1)

    def check_kl() -> float:
        with torch.no_grad():
            return sum(_next_token_kl(student(input_ids=w[None], use_cache=False).logits[0], teacher_logp(w)).item()
                       for w in check_ids) / len(check_ids)

    start = time.perf_counter()
    before = check_kl()
    best = (before, None)
    lr = tune_lr_for(next(iter(result.weights.values())).bits) if settings.tune_lr is None else settings.tune_lr
    optimizer = torch.optim.Adam(gains + list(norm_weights.values()), lr=lr)
    steps = settings.tune_epochs * tune_ids.shape[0]
    # linear decay to zero: the last steps settle instead of stepping as far as the first
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    generator = torch.Generator().manual_seed(settings.seed)
    history = []
    with torch.enable_grad():
        for epoch in range(settings.tune_epochs):
            total = 0.0
            for i in torch.randperm(tune_ids.shape[0], generator=generator).tolist():
                target = teacher_logp(tune_ids[i])
                loss = _next_token_kl(student(input_ids=tune_ids[i][None], use_cache=False).logits[0], target)
                if not torch.isfinite(loss):  # the best epoch so far (or the block-wise merge) stands
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item()
            finite = bool(torch.isfinite(loss))
            after = check_kl() if finite else float("nan")
            history.append({"epoch": epoch + 1, "train_kl": total / tune_ids.shape[0], "check_kl": after})
            log(f"merge tuning epoch {epoch + 1}/{settings.tune_epochs}: train KL {total / tune_ids.shape[0]:.4f}, "
                f"held-out KL {after:.4f} (before {before:.4f})")
            if not finite:
                break
            if after < best[0]:
                best = (after, {name: module.export() for name, module in tuned.items()},
                        {name: w.detach().clone() for name, w in norm_weights.items()})
    if best[1] is not None:
        result.weights.update(best[1])
        result.tensors.update(best[2])
    inner.train(was_training)
    return {"check_kl_before": before, "check_kl_after": best[0], "kept": best[1] is not None, "lr": lr,
            "epochs": history, "seconds": round(time.perf_counter() - start, 1)}


# ---- the merged checkpoint ---------------------------------------------------------------------------------

def save_merged(out_dir, base_dir, result: MergeResult, extra: dict) -> dict:
    """Write the merged model into ``out_dir``: the base's checkpoint (config.json with its GPTQ or bitsandbytes
    quantization_config, every tensor) with each merged projection's tensors replaced, and its quantization.json
    with ``merge`` = ``extra`` added. No adapter is written. Returns the quantization.json written."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    from peftkit.quant.checkpoint import BASE_FILE, INFO_FILE, _layer_parts, _layer_tensors, _read_tensors, read_info

    out_dir, base_dir = Path(out_dir), Path(base_dir)
    info = read_info(base_dir)
    tensors = _read_tensors(base_dir)
    packed_bytes = 0
    for name, layer in info["layers"].items():
        parts = _layer_parts(tensors, name)
        if name in result.weights:
            for key in parts:
                del tensors[f"{name}.{key}"]
            tensors.update(_layer_tensors(name, result.weights[name], parts.get("bias")))
    for name, value in result.tensors.items():
        if name not in tensors:
            raise ValueError(f"the base checkpoint {base_dir} has no tensor {name} for the tuned value")
        tensors[name] = value.to(tensors[name].dtype)
        if layer["kind"] != "none":
            packed_bytes += sum(t.numel() * t.element_size() for k, t in _layer_parts(tensors, name).items()
                                if k != "bias")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / BASE_FILE), metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    info = {**info, "packed_bytes": packed_bytes,
            "model_bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "merge": extra}
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    return info

