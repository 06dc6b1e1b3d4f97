"""Quantizers: one file each, registered in ``QUANTIZERS`` (peftkit.utils.registry) under the name a quantize recipe's
``quant.method`` gives; the pipeline (peftkit/quant/pipeline.py) walks the blocks and hands each one to the quantizer.

A quantizer gets one block at a time (``BlockWork``): the full-precision block, its copy whose projections are
QuantLinears (fake-quantized weight + LoRA), the block's inputs on the full-precision chain X and on the quantized
chain Xq, the full-precision block's output F(X; W), and the keyword arguments the model's decoder passes to that
block. It returns what a checkpoint stores for each projection and what its calibration did.

To add one: a file here with a ``Quantizer`` subclass decorated ``@QUANTIZERS.register("name", help=...)``. Keep
module-level imports light (torch is imported inside ``quantize_block``): recipe validation reads the class
attributes.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass
class BlockWork:
    """One decoder block as a quantizer sees it (tensors are (windows, tokens, hidden); None without windows)."""

    index: int
    block: Any  # the full-precision block, left unchanged
    qblock: Any  # its copy whose projections are QuantLinears
    qlinears: dict  # path inside the block -> QuantLinear
    x_fp: Any  # block input on the full-precision chain
    x_q: Any  # block input on the quantized chain
    y_fp: Any  # the full-precision block's output F(X; W)
    kwargs: dict  # what the model's decoder passes to this block (position embeddings, its own attention mask)
    settings: Any  # apiq.CalibSettings
    options: Any  # the quant section (QuantArgs or an object with its fields)


class Quantizer(abc.ABC):
    """What a quantizer is: its needs (``calibrated``), what it learns (``learned_clipping``) and the codes it
    writes (``codes``: "uniform", stored in the GPTQ layout; "nf", normal-float, stored for bitsandbytes at 4 bits)."""

    name: ClassVar[str] = ""
    calibrated: ClassVar[bool] = False  # needs calibration windows
    learned_clipping: ClassVar[bool] = False  # QuantLinear gets clipping logits gamma, beta
    codes: ClassVar[str] = "uniform"
    symmetric_refusal: ClassVar[str | None] = None  # why quant.symmetric does not apply, where it does not

    @abc.abstractmethod
    def quantize_block(self, work: BlockWork) -> tuple[dict, list]:
        """(path -> QuantizedWeight for every QuantLinear of ``work.qblock``, CalibReports). Afterwards each QuantLinear
        computes with the weight that is stored (``QuantLinear.freeze``) and holds its initial LoRA."""
