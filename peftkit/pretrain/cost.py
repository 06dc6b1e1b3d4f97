"""Analytic FLOPs of one pretraining step (matrix multiplications only, 2 FLOPs per multiply-add).

Per encoder layer, forward, for a row of s tokens of width d with FFN width f:
    Q, K, V, O projections 8·s·d², FFN 4·s·d·f, attention scores and mixing 4·s²·d
(= 24·s·d² + 4·s²·d for f = 4d). A 3ML-cross decoder layer over n queries with m encoder states adds
cross-attention: Q, O on the queries 4·n·d², K, V on the memory 4·m·d², scores and mixing 4·n·m·d.
The MLM head on T target positions: dense 2·T·d², vocabulary projection 2·T·d·V.
A training step is forward + backward; backward multiplies twice as much as forward (gradients of
both operands of every product), so a step costs 3 × forward.
"""

from __future__ import annotations


def layer_flops(rows, length, d: int, f: int):
    return rows * (8 * length * d * d + 4 * length * d * f + 4 * length * length * d)


def cross_layer_flops(rows, queries, memory, d: int, f: int):
    cross = 4 * queries * d * d + 4 * memory * d * d + 4 * queries * memory * d
    return layer_flops(rows, queries, d, f) + rows * cross


def head_flops(targets, d: int, vocab: int):
    return 2 * targets * d * d + 2 * targets * d * vocab


def forward_flops(config, variant: str, rows: int, length, kept, targets, early_layers: int = 0, decoder_layers: int = 0):
    """Forward FLOPs for ``rows`` rows of ``length`` tokens of which ``kept`` (padded count) are not [MASK]
    and ``targets`` positions (whole batch) go through the head. Lengths may be expected (float) values.

    early_layers: layers that run on the kept tokens only (0 for vanilla MLM, L for 3ML-cross).
    """
    d, f, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    if variant == "3ml-cross":
        total = layers * layer_flops(rows, kept, d, f) + decoder_layers * cross_layer_flops(rows, length, kept, d, f)
    else:
        early = 0 if variant == "mlm" else early_layers
        total = early * layer_flops(rows, kept, d, f) + (layers - early) * layer_flops(rows, length, d, f)
    return total + head_flops(targets, d, vocab)


def step_flops(*args, **kwargs):
    """Forward + backward FLOPs of one training step (3 × forward)."""
    return 3 * forward_flops(*args, **kwargs)


def early_layers_of(config, variant: str, full_length_layers: int) -> int:
    """How many encoder layers run on the unmasked tokens only."""
    return {"mlm": 0, "3ml-self": config.num_hidden_layers - full_length_layers, "3ml-cross": config.num_hidden_layers}[variant]


def expected_step_flops(config, variant: str, rows: int, length: int, mask_rate: float, mask_fraction: float = 0.8,
                        special_tokens: int = 2, full_length_layers: int = 2, decoder_layers: int = 2) -> float:
    """Step FLOPs with the expected numbers of targets and [MASK]s per row (for planning equal-compute runs)."""
    targets = mask_rate * (length - special_tokens)
    removed = 0.0 if variant == "mlm" else targets * mask_fraction
    return step_flops(config, variant, rows, length, kept=length - removed, targets=rows * targets,
                      early_layers=early_layers_of(config, variant, full_length_layers), decoder_layers=decoder_layers)
