"""Mistral: LLaMA's block inputs, with the sliding-window causal mask when config.sliding_window is set (as
MistralModel.forward chooses it)."""

from __future__ import annotations

from peftkit.models.families.llama import rotary_decoder_inputs


def mistral_decoder_inputs(decoder, input_ids, attention_mask, position_ids, inputs_embeds):
    return rotary_decoder_inputs(decoder, input_ids, attention_mask, position_ids, inputs_embeds,
                                 sliding_window=getattr(decoder.config, "sliding_window", None) is not None)


DECODER_INPUTS = (mistral_decoder_inputs, None)
