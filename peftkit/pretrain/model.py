"""The pretraining model: one RobertaForMaskedLM (what gets exported) plus what 3ML adds for pretraining.

variant "mlm"        vanilla RoBERTa MLM: every layer sees the full corrupted sequence ([MASK] ids included).
variant "3ml-self"   layers 1..Le see only the tokens that are not [MASK] (original position ids kept); before
                     layer Le+1 each removed slot comes back, in order, as a shared learned [MASK] vector plus
                     its position embedding (embedding LayerNorm + dropout); layers Le+1..L run at full length.
                     Le = L - full_length_layers.
variant "3ml-cross"  all L layers see only the tokens that are not [MASK]; a small decoder runs on the full-length
                     sequence and feeds the MLM head. Its input has, at every kept slot, the encoder's output state
                     of that token and, at every removed slot, the shared [MASK] vector plus the slot's position
                     embedding (as 3ML-self re-inserts them); its layers self-attend over that sequence and
                     cross-attend to the encoder states (see peftkit/pretrain/decoder.py for why both).
In every variant the vocabulary head runs on the prediction targets only (labels != -100), as RoBERTa's
original implementation does, so the vanilla baseline pays no head cost for unmasked positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftkit.models.families import layers_of
from peftkit.pretrain.corruption import IGNORE_INDEX
from peftkit.pretrain.cost import early_layers_of
from peftkit.pretrain.shorten import shorten

VARIANTS = ("mlm", "3ml-self", "3ml-cross")


@dataclass
class PretrainOutput:
    loss: torch.Tensor
    logits: torch.Tensor  # (T, vocab) at the targets, in (row, position) order
    hidden: torch.Tensor | None = None  # (B, n, d) states the head reads (only with return_hidden=True)


class MaskedLMPretrainer(nn.Module):
    def __init__(self, config, variant: str = "3ml-self", full_length_layers: int = 2, decoder_layers: int = 2,
                 mlm=None):
        """``mlm``: an existing RobertaForMaskedLM to wrap (shared weights, e.g. to compare variants); None = new."""
        super().__init__()
        from transformers import RobertaForMaskedLM

        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        layers = config.num_hidden_layers
        if variant == "3ml-self" and not 1 <= full_length_layers <= layers:
            raise ValueError(f"full_length_layers must be in 1..{layers} for 3ml-self, got {full_length_layers}")
        self.variant = variant
        self.mlm = mlm if mlm is not None else RobertaForMaskedLM(config)
        self.early_layers = early_layers_of(config, variant, full_length_layers)
        if variant != "mlm":
            # the [MASK] vector is its own parameter, disentangled from the word embedding table
            self.mask_embedding = nn.Parameter(torch.randn(config.hidden_size) * config.initializer_range)
        if variant == "3ml-cross":
            from peftkit.pretrain.decoder import CrossDecoder

            self.decoder = CrossDecoder(config, decoder_layers)

    @property
    def config(self):
        return self.mlm.config

    # ---- pieces ---------------------------------------------------------------------------------
    def position_ids(self, attention_mask):
        """RoBERTa position ids (padding_idx + 1, + 2, ... over real tokens; padding_idx on padding)."""
        pad = self.config.pad_token_id
        mask = attention_mask.long()
        return torch.cumsum(mask, dim=1) * mask + pad

    def _run_layers(self, layers, hidden, padding_mask):
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=padding_mask)
        for layer in layers:
            hidden = layer(hidden, mask)
        return hidden

    def mask_slots(self, positions):
        """The states of re-inserted [MASK]s: shared vector + position embedding, then LayerNorm/dropout."""
        emb = self.mlm.roberta.embeddings
        return emb.dropout(emb.LayerNorm(self.mask_embedding + emb.position_embeddings(positions)))

    def encode_unmasked(self, input_ids, attention_mask, removed, positions, num_layers: int):
        """Embed the tokens that are not [MASK] (at their original positions) and run the first layers on them."""
        short = shorten(attention_mask.bool() & ~removed)
        hidden = self.mlm.roberta.embeddings(input_ids=short.gather(input_ids), position_ids=short.gather(positions))
        hidden = self._run_layers(layers_of(self.mlm)[:num_layers], hidden, short.mask)
        return hidden, short

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, labels=None, removed=None, return_hidden: bool = False):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if removed is None:
            removed = torch.zeros_like(input_ids, dtype=torch.bool)
        positions = self.position_ids(attention_mask)

        if self.variant == "mlm":
            hidden = self.mlm.roberta(input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=positions).last_hidden_state
        elif self.variant == "3ml-self":
            short_hidden, short = self.encode_unmasked(input_ids, attention_mask, removed, positions, self.early_layers)
            full = short.scatter_into(short_hidden, self.mask_slots(positions))
            hidden = self._run_layers(layers_of(self.mlm)[self.early_layers:], full, attention_mask)
        else:
            memory, short = self.encode_unmasked(input_ids, attention_mask, removed, positions, self.early_layers)
            # the decoder's stream carries the encoded tokens at their slots, [MASK]+position elsewhere
            stream = short.scatter_into(memory, self.mask_slots(positions))
            hidden = self.decoder(stream, attention_mask, memory, short.mask)

        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        targets = labels != IGNORE_INDEX
        logits = self.mlm.lm_head(hidden[targets])
        if logits.shape[0]:
            loss = nn.functional.cross_entropy(logits, labels[targets])
        else:  # no targets in this batch: a zero that still belongs to the graph
            loss = logits.sum() * 0.0
        return PretrainOutput(loss=loss, logits=logits, hidden=hidden if return_hidden else None)
