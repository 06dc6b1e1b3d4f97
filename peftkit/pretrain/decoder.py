"""The small decoder of 3ML-cross: RoBERTa blocks with self-attention over the full-length query sequence
and cross-attention to the encoder states of the unmasked tokens. Bidirectional (never causal).
It exists only for pretraining; the exported checkpoint drops it."""

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
        """queries (B, n, d) with padding mask (B, n); memory = encoder states (B, K, d) with mask (B, K)."""
        from transformers.masking_utils import create_bidirectional_mask

        self_mask = create_bidirectional_mask(config=self.config, inputs_embeds=queries, attention_mask=query_mask)
        cross_mask = create_bidirectional_mask(config=self.config, inputs_embeds=queries, attention_mask=memory_mask,
                                               encoder_hidden_states=memory)
        hidden = queries
        for layer in self.layers:
            hidden = layer(hidden, self_mask, memory, encoder_attention_mask=cross_mask)
        return hidden
