"""Mutation check: inject plausible bugs one at a time into a copy of the package and see the tests catch each.

  python scripts/mutation_check.py --json docs/results/mutation-check.json
  python scripts/mutation_check.py --only apiq-error-propagation lora-scaling-qlinear
  python scripts/mutation_check.py --rev HEAD     # the committed files, whatever is being edited
  python scripts/mutation_check.py --list

Each mutant replaces one snippet (which must occur exactly once in its file) and names the few tests that should
fail because of it: tests that check the broken invariant directly. The repository itself is never modified: the
package, the tests and the project files are copied to a temporary directory, and every pytest run happens there
(cwd and PYTHONPATH = the copy, so the copy's ``peftkit`` is imported, not the editable install; this is checked
before any mutant runs). The unmutated killers run first and must pass. No bytecode is written, so a restored file
is never shadowed by the mutant's cached bytecode.

The JSON (``--json``) has one row per mutant (id, description, file, killed, killed_by, seconds), the machine and
the totals; the exit status is 1 when a mutant survived or was invalid.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("peftkit", "tests", "pyproject.toml", "conftest.py", "setup.cfg", "pytest.ini")
PER_MUTANT_TIMEOUT = 600


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    description: str
    killers: tuple[str, ...]


def M(id, file, old, new, description, *killers):  # noqa: N802 - a table row, read as one
    return Mutant(id, file, old, new, description, tuple(killers))


APIQ_T = "tests/quant/test_apiq_invariants.py::"
GRID_T = "tests/quant/test_uniform_grid.py::"
LORA_T = "tests/methods/test_lora_scaling.py::"
CLIP_T = "tests/train/test_clipping_applied.py::"
MERGE_TUNE_T = ("tests/artifacts/test_lowbit_merge.py::test_end_to_end_tuning_moves_only_scales_and_norms_and_brings_"
                "the_merge_closer_to_the_unmerged_model")
TRAIN_T = "tests/train/test_trainer_invariants.py::"

MUTANTS: list[Mutant] = [
    # ---- ApiQ: what the objectives compare ---------------------------------------------------------------
    M("apiq-error-propagation", "peftkit/quant/pipeline.py",
      "x_fp, x_q = y_fp, y_q", "x_fp, x_q = y_fp, y_fp",
      "the next block is calibrated on the FP chain's outputs instead of the quantized chain's",
      APIQ_T + "test_bw_next_block_is_calibrated_on_the_quantized_chain"),
    M("apiq-lw-error-propagation", "peftkit/quant/pipeline.py",
      "y_q = run_block_batched(qblock, x_q, kwargs, options.batch_size) if y_fp is not None else None",
      "y_q = run_block_batched(block, x_q, kwargs, options.batch_size) if y_fp is not None else None",
      "the quantized chain advances through the FP block (Xq never carries quantization error)",
      APIQ_T + "test_lw_next_block_is_calibrated_on_the_quantized_chain"),
    M("apiq-bw-target-on-quantized-chain", "peftkit/quant/pipeline.py",
      "y_fp = run_block_batched(block, x_fp, kwargs, options.batch_size) if x_fp is not None else None",
      "y_fp = run_block_batched(block, x_q, kwargs, options.batch_size) if x_fp is not None else None",
      "ApiQ-bw's target F(X; W) computed from the quantized chain's input",
      APIQ_T + "test_bw_target_is_the_fp_block_on_the_fp_chain_and_aug_target_the_fp_block_on_the_quantized_chain"),
    M("apiq-bw-aug-target-is-fp-output", "peftkit/quant/quantizers/apiq_bw.py",
      "y_aug = run_block_batched(qblock, work.x_q, work.kwargs, settings.batch_size)",
      "y_aug = work.y_fp",
      "ApiQ-bw's aug target F(Xq; W) replaced by the FP chain's output F(X; W)",
      APIQ_T + "test_bw_target_is_the_fp_block_on_the_fp_chain_and_aug_target_the_fp_block_on_the_quantized_chain"),
    M("apiq-bw-aug-target-quantized", "peftkit/quant/quantizers/apiq_bw.py",
      "                q.fp_mode = True\n", "                q.fp_mode = False\n",
      "ApiQ-bw's aug target computed by the quantized block itself (FP mode not switched on)",
      APIQ_T + "test_bw_target_is_the_fp_block_on_the_fp_chain_and_aug_target_the_fp_block_on_the_quantized_chain"),
    M("apiq-bw-aug-loss-uses-fp-target", "peftkit/quant/apiq.py",
      "loss = loss + F.mse_loss(out, y_aug[sl])", "loss = loss + F.mse_loss(out, y_fp[sl])",
      "ApiQ-bw's aug loss term compares with the FP target instead of the aug target",
      APIQ_T + "test_bw_target_is_the_fp_block_on_the_fp_chain_and_aug_target_the_fp_block_on_the_quantized_chain"),
    M("apiq-bw-no-aug-when-off", "peftkit/quant/apiq.py",
      "        if y_aug is not None:\n            loss = loss + F.mse_loss(out, y_aug[sl])",
      "        loss = loss + F.mse_loss(out, y_fp[sl])",
      "ApiQ-bw adds a second term even when aug_loss is off",
      APIQ_T + "test_bw_without_aug_compares_with_the_fp_target_only"),
    M("apiq-lw-target-from-quantized-input", "peftkit/quant/apiq.py",
      "target = F.linear(inputs_fp[sl], qlinear.weight, qlinear.bias)",
      "target = F.linear(inputs_q[sl], qlinear.weight, qlinear.bias)",
      "ApiQ-lw's target W x computed from the quantized-chain input instead of the FP input",
      APIQ_T + "test_lw_target_is_W_times_the_fp_input_and_the_quantized_linear_sees_the_quantized_input"),
    M("apiq-lw-layer-fed-fp-input", "peftkit/quant/apiq.py",
      "return F.mse_loss(qlinear(inputs_q[sl]), target)", "return F.mse_loss(qlinear(inputs_fp[sl]), target)",
      "ApiQ-lw's quantized layer fed the FP input instead of its quantized-chain input",
      APIQ_T + "test_lw_quantized_linear_is_fed_its_quantized_chain_input"),
    M("apiq-lw-fp-inputs-from-quantized-chain", "peftkit/quant/quantizers/apiq_lw.py",
      "fp_inputs = capture_linear_inputs(block, {n: block.get_submodule(n) for n in qlinears}, x_fp, kwargs,",
      "fp_inputs = capture_linear_inputs(block, {n: block.get_submodule(n) for n in qlinears}, x_q, kwargs,",
      "ApiQ-lw's FP layer inputs captured on the quantized chain",
      APIQ_T + "test_lw_target_is_W_times_the_fp_input_and_the_quantized_linear_sees_the_quantized_input"),
    M("apiq-learning-rates-swapped", "peftkit/quant/apiq.py",
      '"lr": lr_clip},\n                  {"params": [p for q in qlinears for p in q.lora_parameters()], "lr": lr_lora}]',
      '"lr": lr_lora},\n                  {"params": [p for q in qlinears for p in q.lora_parameters()], "lr": lr_clip}]',
      "ApiQ's two learning rates swapped (LoRA gets lr_clip, the clipping logits lr_lora)",
      APIQ_T + "test_clipping_logits_get_lr_clip_and_lora_gets_lr_lora"),
    M("apiq-clip-logits-not-trained", "peftkit/quant/apiq.py",
      'groups = [{"params": [p for q in qlinears for p in q.clip_parameters()], "lr": lr_clip},',
      'groups = [{"params": [], "lr": lr_clip},',
      "ApiQ's clipping logits left out of the optimizer",
      APIQ_T + "test_clipping_logits_get_lr_clip_and_lora_gets_lr_lora"),
    # ---- LoRA scaling ----------------------------------------------------------------------------------
    M("lora-scaling-qlinear", "peftkit/quant/qlinear.py",
      "out = out + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling",
      "out = out + F.linear(F.linear(x, self.lora_A), self.lora_B)",
      "QuantLinear drops LoRA's alpha/r scaling",
      LORA_T + "test_quant_linear_update_is_scaling_times_BAx"),
    M("lora-scaling-pipeline", "peftkit/quant/pipeline.py",
      "scaling = options.lora_alpha / options.lora_r", "scaling = options.lora_alpha",
      "the quantizer's LoRA scaling is alpha instead of alpha/r",
      LORA_T + "test_quant_linear_scaling_is_what_the_pipeline_passes"),
    M("lora-alpha-method", "peftkit/methods/lora.py",
      "lora_alpha=options.alpha,", "lora_alpha=options.r,",
      "the lora method passes r as alpha (scaling 1)",
      LORA_T + "test_lora_method_update_is_alpha_over_r_times_BAx"),
    M("lora-alpha-quantized-model", "peftkit/quant/result.py",
      "LoraConfig(r=r, lora_alpha=alpha,", "LoraConfig(r=r, lora_alpha=r,",
      "the peft model of a quantized result is built with scaling 1",
      LORA_T + "test_quantizer_lora_is_built_with_alpha_over_r"),
    M("lora-merge-quantized-scaling", "peftkit/methods/apiq.py",
      "weight += (B.float() @ A.float()) * module.scaling[adapter]", "weight += B.float() @ A.float()",
      "merging LoRA into an unpacked quantized weight drops alpha/r",
      LORA_T + "test_quantized_lora_merge_folds_alpha_over_r_times_BA_into_the_weight"),
    # ---- uniform quantizer, RTN, GPTQ packing -----------------------------------------------------------
    M("uniform-levels-2pow-b", "peftkit/quant/uniform.py",
      "    qmax = 2 ** bits - 1\n    if symmetric:", "    qmax = 2 ** bits\n    if symmetric:",
      "the scale divides the range into 2^b steps instead of 2^b - 1",
      GRID_T + "test_codes_scales_zeros_and_dequantized_weight_equal_the_reference"),
    M("uniform-codes-clamp", "peftkit/quant/uniform.py",
      "return unclamped.clamp(0, qmax), unclamped", "return unclamped.clamp(0, qmax - 1), unclamped",
      "codes clamped to 2^b - 1 levels (the top code never used)",
      GRID_T + "test_rtn_uses_exactly_2_pow_b_levels_from_0_to_2_pow_b_minus_1"),
    M("uniform-zero-floor", "peftkit/quant/uniform.py",
      "zero = (round_ste(zero_real) if ste else torch.round(zero_real)).clamp(0, qmax)",
      "zero = (round_ste(zero_real) if ste else torch.floor(zero_real)).clamp(0, qmax)",
      "the zero point floored instead of rounded",
      GRID_T + "test_zero_point_is_round_to_nearest_not_floor_or_ceil"),
    M("uniform-zero-not-clamped", "peftkit/quant/uniform.py",
      "zero = (round_ste(zero_real) if ste else torch.round(zero_real)).clamp(0, qmax)",
      "zero = round_ste(zero_real) if ste else torch.round(zero_real)",
      "the zero point not kept inside the code range",
      GRID_T + "test_codes_scales_zeros_and_dequantized_weight_equal_the_reference"),
    M("uniform-dequant-formula", "peftkit/quant/uniform.py",
      "weight = (codes - zero[..., None]) * scale[..., None]", "weight = codes * scale[..., None] - zero[..., None]",
      "dequantization computes scale*q - zero instead of scale*(q - zero)",
      GRID_T + "test_codes_scales_zeros_and_dequantized_weight_equal_the_reference"),
    M("uniform-fused-floor", "peftkit/quant/uniform.py",
      "unclamped = torch.round(ratio).add_(z)", "unclamped = torch.floor(ratio).add_(z)",
      "the fused fake-quant rounds W/scale down instead of to nearest",
      GRID_T + "test_codes_scales_zeros_and_dequantized_weight_equal_the_reference"),
    M("uniform-symmetric-zero", "peftkit/quant/uniform.py",
      "zero = torch.full_like(scale, float(2 ** (bits - 1)))", "zero = torch.full_like(scale, float(2 ** (bits - 1) - 1))",
      "the symmetric zero point is 2^(b-1) - 1 instead of GPTQ's 2^(b-1)",
      GRID_T + "test_codes_scales_zeros_and_dequantized_weight_equal_the_reference"),
    M("uniform-scale-not-fp16", "peftkit/quant/uniform.py",
      "return _Fp16STE.apply(x) if ste else x.to(torch.float16).to(x.dtype)", "return _Fp16STE.apply(x) if ste else x",
      "the exported scale is not rounded to float16 (what a GPTQ checkpoint stores)",
      GRID_T + "test_codes_scales_zeros_and_dequantized_weight_equal_the_reference"),
    M("rtn-with-learned-clipping", "peftkit/quant/pipeline.py",
      "lwc=quantizer.learned_clipping, r=r", "lwc=True, r=r",
      "RTN quantizes with the clipping logits' initial clipping instead of the full min/max range",
      GRID_T + "test_rtn_method_of_the_pipeline_is_plain_min_max_rtn"),
    M("gptq-zeros-v1", "peftkit/quant/gptq_format.py",
      '"qzeros": pack_rows(zeros.to(torch.int64).T.contiguous(), bits).contiguous(),',
      '"qzeros": pack_rows((zeros.to(torch.int64) - 1).clamp(min=0).T.contiguous(), bits).contiguous(),',
      "GPTQ zero points stored as z - 1 (the v1 off-by-one) in a gptq_v2 checkpoint",
      GRID_T + "test_gptq_tensors_decode_to_scale_times_code_minus_zero"),
    M("gptq-dequant-off-by-one", "peftkit/quant/gptq_format.py",
      "weight = scales[index] * (codes - zeros[index]).to(scales.dtype)",
      "weight = scales[index] * (codes - zeros[index] - 1).to(scales.dtype)",
      "the GPTQ reader decodes scale*(q - z - 1)",
      GRID_T + "test_gptq_tensors_decode_to_scale_times_code_minus_zero"),
    M("gptq-3bit-straddle", "peftkit/quant/gptq_format.py",
      "high_part = (high.unsqueeze(-1) >> (3 * j[21:] - 32)) & mask",
      "high_part = (high.unsqueeze(-1) >> (3 * j[21:] - 31)) & mask",
      "3-bit GPTQ unpacking misreads the values that straddle 32-bit words",
      "tests/quant/test_gptq_format.py::test_codes_scales_and_zeros_round_trip_bit_exactly"),
    M("packing-big-endian", "peftkit/quant/packing.py",
      "    shifts = torch.arange(8, device=flat.device) * bits\n    words = (flat << shifts).sum(dim=1)",
      "    shifts = (7 - torch.arange(8, device=flat.device)) * bits\n    words = (flat << shifts).sum(dim=1)",
      "codes packed most significant first (not the little-endian stream GPTQ reads)",
      GRID_T + "test_packed_bytes_hold_codes_little_endian_b_bits_each"),
    # ---- NF (QLoRA start) and LoftQ ---------------------------------------------------------------------
    M("nf-nearest-level", "peftkit/quant/normal_float.py",
      "midpoints = (levels[1:] + levels[:-1]) / 2", "midpoints = levels[1:]",
      "NF rounds down to the level below instead of to the nearest level",
      "tests/quant/test_normal_float.py::test_each_weight_takes_the_nearest_level"),
    M("nf-absmax-signed", "peftkit/quant/normal_float.py",
      "absmax = groups.abs().amax(dim=-1).clamp(min=1e-12)", "absmax = groups.amax(dim=-1).clamp(min=1e-12)",
      "NF scales each group by its max instead of its absolute max",
      "tests/quant/test_nf_loftq_reference.py::test_nf_scales_each_group_by_its_largest_magnitude_and_takes_the_nearest_level"),
    M("loftq-no-scaling", "peftkit/quant/loftq.py",
      "B = U[:, :r] * root / scaling", "B = U[:, :r] * root",
      "LoftQ's B is not divided by alpha/r, so s*B*A overshoots the residual",
      "tests/quant/test_loftq.py::test_one_iteration_is_the_svd_of_the_nf_residual"),
    M("loftq-residual-of-wrong-term", "peftkit/quant/loftq.py",
      "codes, absmax = nf_quantize(weight - lora_product, bits, group_size)",
      "codes, absmax = nf_quantize(weight, bits, group_size)",
      "LoftQ's iterations quantize W instead of W - s*B*A (no alternation)",
      "tests/quant/test_nf_loftq_reference.py::test_loftq_iterations_quantize_the_weight_minus_the_previous_lora"),
    # ---- PaFi, HiWi, BitFit, head-only ------------------------------------------------------------------
    M("pafi-largest-magnitude", "peftkit/methods/pafi.py",
      "below = (scores < threshold).nonzero().flatten()", "below = (scores > threshold).nonzero().flatten()",
      "PaFi picks entries above the threshold (largest) instead of the smallest magnitudes",
      "tests/methods/test_pafi.py::test_chosen_are_exactly_the_smallest_magnitudes_with_ties"),
    M("pafi-signed-scores", "peftkit/methods/pafi.py",
      "scores = {name: t.abs().float().reshape(-1) for name, t in tensors.items()}",
      "scores = {name: t.float().reshape(-1) for name, t in tensors.items()}",
      "PaFi ranks by signed value instead of magnitude (picks the most negative weights)",
      "tests/methods/test_pafi.py::test_chosen_are_exactly_the_smallest_magnitudes_with_ties"),
    M("pafi-ties-highest", "peftkit/methods/pafi.py",
      "tied = (scores == threshold).nonzero().flatten()[: k - below.numel()]",
      "tied = (scores == threshold).nonzero().flatten().flip(0)[: k - below.numel()]",
      "PaFi breaks ties at the threshold towards the highest positions (the mask is no longer the documented one)",
      "tests/methods/test_pafi.py::test_chosen_are_exactly_the_smallest_magnitudes_with_ties"),
    M("pafi-budget-truncated", "peftkit/methods/pafi.py",
      "picked = smallest_entries(flat, round(options.rho * flat.numel()))",
      "picked = smallest_entries(flat, int(options.rho * flat.numel()))",
      "PaFi's budget truncated instead of rounded: k = int(rho * N)",
      "tests/methods/test_pafi.py::test_trains_exactly_round_rho_n_entries"),
    M("hiwi-no-relu", "peftkit/methods/hiwi.py",
      "return param + (torch.relu(rows @ self.down) @ self.up).reshape(param.shape)",
      "return param + ((rows @ self.down) @ self.up).reshape(param.shape)",
      "HiWi's adapter without its ReLU",
      "tests/methods/test_hiwi.py::test_forward_uses_p_plus_relu_p_down_up"),
    M("merge-tuning-scales-not-exported", "peftkit/quant/merge.py",
      "scales = self.scales().to(q.scales.dtype)", "scales = self.scales0.to(q.scales.dtype)",
      "the low-bit merge's end-to-end tuning writes the block-wise scales instead of the tuned ones",
      MERGE_TUNE_T),
    M("merge-tuning-norms-not-written", "peftkit/quant/merge.py",
      "tensors[name] = value.to(tensors[name].dtype)", "tensors[name] = tensors[name]",
      "the low-bit merge's tuned norm weights never reach the written checkpoint",
      MERGE_TUNE_T),
    M("hiwi-merge-drops-adapter", "peftkit/methods/hiwi.py",
      "parametrize.remove_parametrizations(module, attr, leave_parametrized=True)",
      "parametrize.remove_parametrizations(module, attr, leave_parametrized=False)",
      "HiWi's merge keeps the original P instead of P + f(P)",
      "tests/methods/test_hiwi.py::test_merged_equals_unmerged_base_architecture_and_only_ffn_changes"),
    M("hiwi-up-not-zero", "peftkit/methods/hiwi.py",
      "self.up = nn.Parameter(torch.zeros(r, width, **kw))", "self.up = nn.Parameter(torch.full((r, width), 0.01, **kw))",
      "HiWi's W_up does not start at zero (the model does not start at the pretrained one)",
      "tests/methods/test_hiwi.py::test_at_init_outputs_equal_the_base"),
    M("bitfit-weights-too", "peftkit/methods/bitfit.py",
      'if name.endswith(".bias"):', 'if name.endswith(".bias") or "LayerNorm" in name:',
      "BitFit also trains the LayerNorm weights",
      "tests/methods/test_baselines.py::test_bitfit_trains_only_biases_and_head"),
    M("head-only-trains-body", "peftkit/methods/base.py",
      "        param.requires_grad_(is_head)\n", "        param.requires_grad_(is_head or name.endswith('.bias'))\n",
      "the head-only freeze leaves the body's biases trainable",
      "tests/methods/test_head_only.py::test_head_only_trains_exactly_the_head_and_nothing_else_moves"),
    # ---- MEFT: reversible reconstruction and gradients -------------------------------------------------
    M("meft-inverse-wrong-factor", "peftkit/models/reversible.py",
      "x1 = arithmetic.unscale(y1, self.f(arithmetic.to_input(x2), **kwargs), self.lam)",
      "x1 = arithmetic.unscale(y1, self.f(arithmetic.to_input(x2), **kwargs), self.beta)",
      "MEFT's inverse divides x1's stream by beta instead of lambda",
      "tests/methods/test_meft.py::test_inverse_reconstructs_the_inputs"),
    M("meft-backward-reconstruction", "peftkit/models/reversible.py",
      "x1 = arithmetic.unscale(y1, f_out.detach(), self.lam)", "x1 = arithmetic.unscale(y1, f_out.detach(), 1.0)",
      "MEFT's backward reconstructs x1 without undoing the lambda scaling",
      "tests/methods/test_meft.py::test_reversible_gradients_equal_autograd"),
    M("meft-backward-gradient-scale", "peftkit/models/reversible.py",
      "dx1 = dy1_total if self.lam == 1 else dy1_total * self.lam", "dx1 = dy1_total",
      "MEFT's backward forgets the lambda factor in dx1",
      "tests/methods/test_meft.py::test_reversible_gradients_equal_autograd"),
    M("meft-fixed-point-remainder", "peftkit/models/reversible.py",
      "return target.add_(word).sub_(self.words[-1], alpha=radix)", "return target.add_(word)",
      "MEFT's fixed-point streams restore a wrong remainder digit",
      "tests/methods/test_meft_reference.py::test_fixed_point_inverse_reconstructs_every_layer_bit_for_bit"),
    # ---- 3ML pre-training: masking and corruption ------------------------------------------------------
    M("corruption-specials-eligible", "peftkit/pretrain/corruption.py",
      "eligible = attention_mask.bool() & ~torch.isin(input_ids, specials)", "eligible = attention_mask.bool()",
      "special tokens (<s>, </s>) can become prediction targets",
      "tests/pretrain/test_pretrain_corruption.py::test_target_rate_and_80_10_10_split"),
    M("corruption-mask-share", "peftkit/pretrain/corruption.py",
      "removed = targets & (u < p_mask)", "removed = targets & (u < p_random)",
      "only 10% of the targets become [MASK] instead of 80%",
      "tests/pretrain/test_pretrain_corruption.py::test_target_rate_and_80_10_10_split"),
    M("corruption-labels-corrupted", "peftkit/pretrain/corruption.py",
      "labels = torch.where(targets, input_ids, torch.full_like(input_ids, IGNORE_INDEX))",
      "labels = torch.where(targets, corrupted, torch.full_like(input_ids, IGNORE_INDEX))",
      "the labels are the corrupted tokens instead of the originals",
      "tests/pretrain/test_pretrain_corruption.py::test_target_rate_and_80_10_10_split"),
    M("3ml-masked-tokens-reach-early-layers", "peftkit/pretrain/model.py",
      "short = shorten(attention_mask.bool() & ~removed)", "short = shorten(attention_mask.bool())",
      "3ML's early layers see the [MASK] tokens too",
      "tests/pretrain/test_pretrain_model.py::test_early_layers_see_exactly_the_unmasked_tokens_at_original_positions"),
    # ---- trainer ----------------------------------------------------------------------------------------
    M("trainer-clipping-not-applied", "peftkit/train/trainer.py",
      "norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.opt.max_grad_norm)",
      "norm = torch.nn.utils.get_total_norm([p.grad for p in self.raw_model.parameters() if p.grad is not None])",
      "gradient clipping skipped (the norm is computed and logged, not applied)",
      CLIP_T + "test_optimizer_steps_on_gradients_clipped_to_max_grad_norm"),
    M("trainer-grad-accum-sum", "peftkit/train/trainer.py",
      "scaled = loss / self.opt.grad_accum", "scaled = loss",
      "accumulated gradients summed over micro-batches instead of averaged",
      CLIP_T + "test_accumulated_gradients_are_the_mean_over_micro_batches"),
    M("trainer-grad-accum-zero-grad", "peftkit/train/trainer.py",
      "        self.optimizer.zero_grad(set_to_none=True)\n        loss_total, rows = 0.0, 0",
      "        loss_total, rows = 0.0, 0",
      "gradients are never zeroed between optimizer steps",
      CLIP_T + "test_each_step_steps_on_its_own_gradients_only"),
    M("schedule-warmup-off-by-one", "peftkit/train/schedule.py",
      "return (step + 1) / warmup_steps", "return step / warmup_steps",
      "the first warmup step has learning rate 0",
      "tests/train/test_train_checkpoint.py::test_schedule_shapes"),
    M("schedule-warmup-ignored", "peftkit/train/schedule.py",
      "warmup = int(round(warmup_ratio * total_steps))", "warmup = 0",
      "the trainer's scheduler ignores warmup_ratio",
      TRAIN_T + "test_each_step_uses_the_warmed_up_then_decayed_learning_rate"),
    M("schedule-decay-from-zero", "peftkit/train/schedule.py",
      "progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)",
      "progress = step / max(1, total_steps)",
      "the decay starts counting at step 0 instead of after warmup",
      TRAIN_T + "test_each_step_uses_the_warmed_up_then_decayed_learning_rate"),
    M("trainer-metric-direction", "peftkit/train/trainer.py",
      "(value > self.best_value if self.greater_is_better else value < self.best_value)",
      "(value < self.best_value if self.greater_is_better else value > self.best_value)",
      "the best checkpoint keeps the worst evaluation",
      TRAIN_T + "test_best_step_follows_the_metric_direction"),
    M("trainer-resume-optimizer-state", "peftkit/train/trainer.py",
      'self._load_state(tensors, torch_state["optimizer"])', "self._load_state(tensors, None)",
      "resuming restores the weights but not AdamW's moments",
      TRAIN_T + "test_resumed_run_continues_with_the_optimizer_moments_and_rng_of_the_checkpoint"),
    M("trainer-resume-data-position", "peftkit/train/trainer.py",
      'self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]',
      'self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], 0',
      "resuming restarts the epoch's data order from its first batch",
      TRAIN_T + "test_resumed_run_continues_with_the_optimizer_moments_and_rng_of_the_checkpoint"),
    M("trainer-resume-schedule", "peftkit/train/trainer.py",
      'self.scheduler.load_state_dict(torch_state["scheduler"])', "pass",
      "resuming restarts the learning-rate schedule from step 0",
      TRAIN_T + "test_resumed_run_continues_with_the_optimizer_moments_and_rng_of_the_checkpoint"),
    M("trainer-resume-rng", "peftkit/train/trainer.py",
      'torch.set_rng_state(torch_state["rng_cpu"])', "pass",
      "resuming does not restore the RNG (dropout and corruption differ from an uninterrupted run)",
      TRAIN_T + "test_resumed_run_continues_with_the_optimizer_moments_and_rng_of_the_checkpoint"),
]


def _copy_tree(dest: Path, rev: str | None) -> None:
    """The package, tests and project files: from the working tree, or as committed at ``rev`` (unaffected by
    edits in progress)."""
    if rev:
        listed = subprocess.run(["git", "ls-tree", "--name-only", rev], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split()
        archive = subprocess.run(["git", "archive", rev, *[n for n in COPIED if n in listed]], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".cache")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / name)


def _env(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["COLUMNS"] = "400"  # pytest cuts its summary lines (and the failure reason) to the terminal width
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


def _probe(copy: Path) -> dict:
    """Where ``peftkit`` is imported from in the copy, and the machine (read by the copy's own code)."""
    code = ("import json, peftkit; from peftkit.utils.tables import machine_info; "
            "print(json.dumps({'file': peftkit.__file__, 'machine': machine_info()}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(copy), capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pytest(copy: Path, nodes, timeout: int) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-rf",
           "--no-header", *nodes]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, out + f"\n(timed out after {timeout} s)", time.perf_counter() - start


def _failed_test(output: str) -> tuple[str | None, str | None]:
    """(node id of the first failing test, its one-line reason from pytest's summary) in a pytest output."""
    found = re.search(r"^(?:FAILED|ERROR) (\S+)(?: - (.*))?$", output, re.M)
    if not found:
        return None, None
    return found.group(1), (found.group(2) or "")[:160] or None


def validate(mutants: list[Mutant], root: Path = ROOT) -> dict[str, str]:
    """mutant id -> why it cannot be applied (its snippet does not occur exactly once, or old == new)."""
    problems = {}
    for m in mutants:
        path = root / m.file
        if not path.is_file():
            problems[m.id] = f"{m.file} does not exist"
            continue
        count = path.read_text().count(m.old)
        if count != 1:
            problems[m.id] = f"snippet occurs {count} times in {m.file} (must be exactly once)"
        elif m.old == m.new:
            problems[m.id] = "old and new snippets are the same"
        elif not m.killers:
            problems[m.id] = "no killer test named"
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    p.add_argument("--list", action="store_true", help="list the mutants and their killers, run nothing")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--rev", help="mutate the files as committed at this git revision (default: the working tree)")
    p.add_argument("--timeout", type=int, default=PER_MUTANT_TIMEOUT, help="seconds per pytest run")
    args = p.parse_args()

    ids = [m.id for m in MUTANTS]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        p.error(f"duplicate mutant ids: {duplicates}")
    chosen = MUTANTS
    if args.only:
        unknown = [i for i in args.only if i not in ids]
        if unknown:
            p.error(f"unknown mutant ids: {unknown} (see --list)")
        chosen = [m for m in MUTANTS if m.id in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.id:40s} {m.file}: {m.description}")
            for k in m.killers:
                print(f"{'':40s}   killer {k}")
        print(f"{len(chosen)} mutants")
        return 0

    source = "working tree"
    if args.rev:
        args.rev = source = subprocess.run(["git", "rev-parse", "--verify", f"{args.rev}^{{commit}}"], cwd=ROOT,
                                           capture_output=True, text=True, check=True).stdout.strip()
    # a terminated run still removes its copy (the temporary directory's cleanup runs on SystemExit)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peftkit-mutants-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy, args.rev)
        invalid = validate(chosen, copy)
        probe = _probe(copy)
        if not Path(probe["file"]).resolve().is_relative_to(copy.resolve()):
            print(f"the copy imports peftkit from {probe['file']}, not from {copy}: stopping", file=sys.stderr)
            return 2
        print(f"copy at {copy}; peftkit imported from {probe['file']}", flush=True)

        killers = sorted({k for m in chosen if m.id not in invalid for k in m.killers})
        rc, output, seconds = _pytest(copy, killers, args.timeout)
        if rc != 0:
            print(output[-4000:], file=sys.stderr)
            print(f"the unmutated killers do not pass (exit {rc}): fix them first", file=sys.stderr)
            return 2
        print(f"{len(killers)} killer tests pass unmutated ({seconds:.0f} s)", flush=True)

        rows = []
        for m in chosen:
            row = {"id": m.id, "description": m.description, "file": m.file}
            if m.id in invalid:
                row.update(killed="invalid", killed_by=None, seconds=0.0, problem=invalid[m.id])
                print(f"INVALID  {m.id}: {invalid[m.id]}", flush=True)
                rows.append(row)
                continue
            target = copy / m.file
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new, 1))
            try:
                rc, output, seconds = _pytest(copy, m.killers, args.timeout)
            finally:
                target.write_text(original)
            killed = rc != 0
            by, reason = _failed_test(output) if killed else (None, None)
            if rc == -1:
                by = "timeout"
            elif killed and by is None:
                by = f"pytest exit {rc}"
            row.update(killed="yes" if killed else "no", killed_by=by, failure=reason, seconds=round(seconds, 1))
            print(f"{'killed ' if killed else 'SURVIVED'} {m.id} ({seconds:.0f} s){' by ' + by if by else ''}", flush=True)
            rows.append(row)

    n_killed = sum(r["killed"] == "yes" for r in rows)
    totals = {"mutants": len(rows), "killed": n_killed, "survived": sum(r["killed"] == "no" for r in rows),
              "invalid": sum(r["killed"] == "invalid" for r in rows),
              "seconds": round(time.perf_counter() - started, 1)}
    print(f"{n_killed}/{len(rows)} mutants killed ({totals['survived']} survived, {totals['invalid']} invalid) "
          f"in {totals['seconds']:.0f} s")
    if args.json:
        command = "python scripts/mutation_check.py" + (f" --rev {args.rev}" if args.rev else "") + \
                  (f" --only {' '.join(args.only)}" if args.only else "") + f" --json {args.json}"
        result = {"bench": "mutation-check", "title": "Mutation check", "machine": probe["machine"],
                  "command": command, "source": source, "totals": totals, "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if totals["survived"] == 0 and totals["invalid"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
