"""ApiQ calibration (Liao et al., 2024): quantize weights and initialise LoRA so that the quantized
network reproduces the FP network's activations.

  layer-wise (lw):  min over gamma, beta, A, B of  || X W^T - Xq (W_hat + s B A)^T ||^2   per Linear
  block-wise (bw):  min over all of a block's     || F(X; W) - F(Xq; W_hat, A, B) ||^2
                    (+ aug: || F(Xq; W) - F(Xq; W_hat, A, B) ||^2)

X is the input in the FP network, Xq the input inside the network whose earlier layers are already
quantized — feeding Xq is what stops the error from compounding. The caller (pipeline.py) walks the
blocks and passes both.

A non-finite loss (seen at 2 bits) never stops the run: the parameters are restored, the learning
rates divided by 10 and the block/layer retried; after ``MAX_RETRIES`` it falls back to plain RTN
with B = 0. Every such event is reported with the block/layer index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from peftkit.quant.blocks import capture_linear_input, run_block
from peftkit.quant.qlinear import QuantLinear

MAX_RETRIES = 2


@dataclass
class CalibSettings:
    epochs: int = 2
    lr_lora: float = 1e-3
    lr_clip: float = 1e-2
    weight_decay: float = 0.0
    aug_loss: bool = True
    batch_size: int = 1
    seed: int = 0


@dataclass
class CalibReport:
    """What one calibration (a block or a layer) did: mean loss per epoch and any NaN events."""

    where: str
    epoch_losses: list[float] = field(default_factory=list)
    nan_events: list[str] = field(default_factory=list)
    fell_back_to_rtn: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"where": self.where, "epoch_losses": self.epoch_losses, "nan_events": self.nan_events,
                "fell_back_to_rtn": self.fell_back_to_rtn, "seconds": round(self.seconds, 3)}


def _optimize(qlinears: list[QuantLinear], batch_loss: Callable[[int], torch.Tensor], n_batches: int,
              settings: CalibSettings, report: CalibReport) -> None:
    """AdamW over clipping logits (lr_clip) and LoRA (lr_lora); retries on a non-finite loss."""
    params = [p for q in qlinears for p in (*q.clip_parameters(), *q.lora_parameters())]
    snapshot = [p.detach().clone() for p in params]
    lr_lora, lr_clip = settings.lr_lora, settings.lr_clip
    for attempt in range(MAX_RETRIES + 1):
        groups = [{"params": [p for q in qlinears for p in q.clip_parameters()], "lr": lr_clip},
                  {"params": [p for q in qlinears for p in q.lora_parameters()], "lr": lr_lora}]
        groups = [g for g in groups if g["params"]]
        if not groups:
            return
        optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
        generator = torch.Generator().manual_seed(settings.seed)
        report.epoch_losses = []
        failed = None
        for epoch in range(settings.epochs):
            total = 0.0
            for step, b in enumerate(torch.randperm(n_batches, generator=generator).tolist()):
                loss = batch_loss(b)
                if not torch.isfinite(loss):
                    failed = f"{report.where}: non-finite loss at epoch {epoch + 1} step {step + 1} (attempt {attempt + 1})"
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
            if failed:
                break
            report.epoch_losses.append(total / n_batches)
        if not failed:
            return
        with torch.no_grad():
            for p, saved in zip(params, snapshot):
                p.copy_(saved)
        lr_lora, lr_clip = lr_lora / 10, lr_clip / 10
        retry = f"retrying with lr_lora={lr_lora:g}, lr_clip={lr_clip:g}" if attempt < MAX_RETRIES else "falling back to RTN with B=0"
        report.nan_events.append(f"{failed}; {retry}")
        print(f"  warning: {failed}; {retry}", flush=True)
    for q in qlinears:
        q.set_rtn_state()
    report.fell_back_to_rtn = True


def calibrate_block(qblock, qlinears: dict[str, QuantLinear], x_q: torch.Tensor, y_fp: torch.Tensor,
                    y_aug: torch.Tensor | None, kwargs: dict, settings: CalibSettings, where: str) -> CalibReport:
    """ApiQ-bw: all Linears of one block at once against the FP block outputs."""
    report = CalibReport(where)
    start = time.perf_counter()
    batches = list(range(0, x_q.shape[0], settings.batch_size))

    def batch_loss(b: int) -> torch.Tensor:
        sl = slice(batches[b], batches[b] + settings.batch_size)
        out = run_block(qblock, x_q[sl], kwargs)
        loss = F.mse_loss(out, y_fp[sl])
        if y_aug is not None:
            loss = loss + F.mse_loss(out, y_aug[sl])
        return loss

    _optimize(list(qlinears.values()), batch_loss, len(batches), settings, report)
    report.seconds = time.perf_counter() - start
    return report


def calibrate_linear(qblock, qlinear: QuantLinear, inputs_fp: torch.Tensor, x_q: torch.Tensor,
                     kwargs: dict, settings: CalibSettings, where: str) -> CalibReport:
    """ApiQ-lw for one Linear: ``inputs_fp`` = its input X in the FP block (captured once per block);
    Xq is captured now from the quantized block, whose earlier Linears are already calibrated."""
    report = CalibReport(where)
    start = time.perf_counter()
    inputs_q = capture_linear_input(qblock, qlinear, x_q, kwargs, settings.batch_size)
    batches = list(range(0, inputs_q.shape[0], settings.batch_size))

    def batch_loss(b: int) -> torch.Tensor:
        sl = slice(batches[b], batches[b] + settings.batch_size)
        with torch.no_grad():
            target = F.linear(inputs_fp[sl], qlinear.weight, qlinear.bias)
        return F.mse_loss(qlinear(inputs_q[sl]), target)

    _optimize([qlinear], batch_loss, len(batches), settings, report)
    report.seconds = time.perf_counter() - start
    return report
