"""Qwen2: LLaMA's block inputs. A model whose config.layer_types mixes sliding-window and full attention gives its
layers different masks, which one set of block arguments cannot: refused."""

from __future__ import annotations

from peftkit.models.families.llama import rotary_decoder_inputs


def full_attention_decoder_inputs(decoder, input_ids, attention_mask, position_ids, inputs_embeds):
    from peftkit.errors import UserError

    if "sliding_attention" in (getattr(decoder.config, "layer_types", None) or ()):
        raise UserError(f"{decoder.config.model_type}: this model has sliding-window attention layers "
                        f"(config.use_sliding_window), whose masks differ from the other layers'; MEFT runs every layer "
                        f"with one causal mask. Set use_sliding_window to false in its config.json, or use another "
                        f"method.")
    return rotary_decoder_inputs(decoder, input_ids, attention_mask, position_ids, inputs_embeds)


DECODER_INPUTS = (full_attention_decoder_inputs, None)
