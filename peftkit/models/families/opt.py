"""OPT: learned positions and the optional input/output projections of its bare decoder, and the dropout each block
applies to its sub-blocks' outputs (a float attribute, not a module, so the structure cannot see it)."""

from __future__ import annotations

RESIDUAL_DROPOUT = "dropout"


def opt_decoder_inputs(decoder, input_ids, attention_mask, position_ids, inputs_embeds):
    """Embeddings plus learned positions and the block keyword arguments, as OPTDecoder.forward builds them."""
    import torch
    from transformers.masking_utils import create_causal_mask

    if input_ids is not None:
        input_ids = input_ids.view(-1, input_ids.shape[-1])
    embeds = decoder.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    dense_mask = attention_mask if attention_mask is not None else torch.ones(embeds.shape[:2], device=embeds.device)
    if position_ids is None:
        position_ids = (torch.cumsum(dense_mask, dim=1) * dense_mask - 1).long()
    mask = create_causal_mask(config=decoder.config, inputs_embeds=embeds, attention_mask=attention_mask,
                              past_key_values=None)
    positions = decoder.embed_positions(dense_mask, 0, position_ids=position_ids)
    if decoder.project_in is not None:
        embeds = decoder.project_in(embeds)
    return embeds + positions.to(embeds.device), {"attention_mask": mask, "position_ids": position_ids}


def opt_output(decoder, hidden):
    return decoder.project_out(hidden) if decoder.project_out is not None else hidden


DECODER_INPUTS = (opt_decoder_inputs, opt_output)
