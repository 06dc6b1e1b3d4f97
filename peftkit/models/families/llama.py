"""LLaMA (and Llama-3 with rope scaling): how the bare model builds the first block's inputs, for methods that run
the block loop themselves (MEFT). Everything else is read from the model's structure."""

from __future__ import annotations


def rotary_decoder_inputs(decoder, input_ids, attention_mask, position_ids, inputs_embeds, sliding_window=False):
    """Embeddings and the block keyword arguments, as LlamaModel.forward builds them (no cache). With
    ``sliding_window`` the mask is the sliding-window causal mask (Mistral's, when config.sliding_window is set)."""
    import torch
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    embeds = decoder.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    if position_ids is None:
        position_ids = torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0)
    make_mask = create_sliding_window_causal_mask if sliding_window else create_causal_mask
    mask = make_mask(config=decoder.config, inputs_embeds=embeds, attention_mask=attention_mask,
                     past_key_values=None, position_ids=position_ids)
    position_embeddings = decoder.rotary_emb(embeds, position_ids=position_ids)
    return embeds, {"attention_mask": mask, "position_embeddings": position_embeddings, "position_ids": position_ids}


DECODER_INPUTS = (rotary_decoder_inputs, None)
