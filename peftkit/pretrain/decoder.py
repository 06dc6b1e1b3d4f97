"""The small decoder of 3ML-cross: RoBERTa blocks with self-attention over a full-length sequence and
cross-attention to the encoder states of the unmasked tokens. Bidirectional (never causal).
It exists only for pretraining; the exported checkpoint drops it.

Its input sequence (built by MaskedLMPretrainer) is, slot by slot:
    kept slot    -> the encoder's output state of that token
    removed slot -> shared [MASK] vector + the slot's position embedding (embedding LayerNorm, dropout)
The card reads "[MASK]-plus-position queries and encoder states": we read it as one full-length stream
holding both, the way 3ML-self re-inserts the [MASK]s between the encoded tokens before its last layers
(and as masked autoencoders feed their decoders). A stream of [MASK]+position at every slot would carry
no token at all: each slot could learn about the tokens only through cross-attention, whose queries are
then nearly the same vector at every slot up to position, and the 10%-random / 10%-unchanged targets
would not even see their own encoded token at their own slot. Trained that way on the small preset, its
evaluation MLM loss stayed at the level of a context-free unigram predictor (it learned little beyond
token frequencies); with the encoded tokens in the stream it drops below that level. Cross-attention to the encoder states is kept as
the card describes it; it costs 4·n·d² + 4·m·d² + 4·n·m·d per layer (peftkit/pretrain/cost.py), the
shapes being the same whatever the stream holds.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class CrossDecoder(nn.Module):
    def __init__(self, config, num_layers: int):
        super().__init__()
        from transformers.models.roberta.modeling_roberta import RobertaLayer

        block_config = copy.deepcopy(config)
        block_config.is_decoder = True  # RobertaLayer only builds cross-attention for decoders ...
        block_config.add_cross_attention = True
        self.layers = nn.ModuleList(RobertaLayer(block_config, layer_idx=i) for i in range(num_layers))
        for layer in self.layers:
            layer.attention.self.is_causal = False  # ... but the queries see each other in both directions
        self.config = config
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RoBERTa's initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, self.config.initializer_range)
                module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def forward(self, queries, query_mask, memory, memory_mask):
        """queries (B, n, d): the full-length stream, padding mask (B, n); memory = encoder states (B, K, d), mask (B, K)."""
        from transformers.masking_utils import create_bidirectional_mask

        self_mask = create_bidirectional_mask(config=self.config, inputs_embeds=queries, attention_mask=query_mask)
        cross_mask = create_bidirectional_mask(config=self.config, inputs_embeds=queries, attention_mask=memory_mask,
                                               encoder_hidden_states=memory)
        hidden = queries
        for layer in self.layers:
            hidden = layer(hidden, self_mask, memory, encoder_attention_mask=cross_mask)
        return hidden
