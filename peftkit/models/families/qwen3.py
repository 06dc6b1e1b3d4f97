"""Qwen3: Qwen2's block inputs (its q/k norms sit inside the attention, which the block loop calls whole)."""

from __future__ import annotations

from peftkit.models.families.qwen2 import DECODER_INPUTS  # noqa: F401 - read by peftkit.models.families
