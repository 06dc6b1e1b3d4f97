"""FLOPs: torch's FlopCounterMode on a tiny model matches the analytic count of cost.py; the bench runs."""

import pytest
from helpers.pretrain import corrupted, tiny_config

from peftkit.bench.flops import analytic_step_flops, count_step_flops, run
from peftkit.pretrain.cost import expected_step_flops, forward_flops
from peftkit.pretrain.model import MaskedLMPretrainer
from peftkit.pretrain.presets import roberta_config


@pytest.mark.parametrize("variant,full_length", [("mlm", 2), ("3ml-self", 1), ("3ml-self", 2), ("3ml-cross", 2)])
def test_counted_flops_match_the_analytic_formula(variant, full_length):
    config = tiny_config(layers=3)
    model = MaskedLMPretrainer(config, variant, full_length_layers=full_length, decoder_layers=2)
    _, batch = corrupted(rows=3, length=40, mask_rate=0.15 if variant == "mlm" else 0.5)
    batch = batch.as_batch()
    counted = count_step_flops(model, batch)
    analytic = analytic_step_flops(model, batch)
    assert counted == pytest.approx(analytic, rel=0.03)


def test_analytic_vanilla_base_forward_matches_the_card():
    """docs/methods/3ml.md: vanilla RoBERTa-base at n = 512 with the head on 15% ≈ 103 GFLOP forward."""
    config = roberta_config("base")
    targets = round(0.15 * 510)
    assert forward_flops(config, "mlm", 1, 512, 512, targets) == pytest.approx(103e9, rel=0.01)
    ratio = expected_step_flops(config, "3ml-self", 1, 512, 0.5, full_length_layers=2) / \
        expected_step_flops(config, "mlm", 1, 512, 0.15)
    assert 0.7 < ratio < 0.85  # removing 40% of the tokens from 10 of 12 layers, head on 50%


def test_bench_rows_on_the_tiny_shape():
    rows = run(True, {"shapes": "tiny", "seq_len": 32, "batch_size": 2, "repeats": 1, "warmup": 0})
    assert [r["variant"] for r in rows] == ["mlm", "3ml-self", "3ml-cross"]
    for key in ("variant", "shape", "mask_rate", "flops", "flops_ratio", "step_seconds", "time_ratio",
                "append_layer", "decoder_layers"):
        assert all(key in r for r in rows)
    assert rows[0]["flops_ratio"] == 1.0 and rows[0]["time_ratio"] == 1.0
    assert rows[1]["append_layer"] == 0 and rows[2]["decoder_layers"] == 2
    assert all(abs(r["analytic_rel_err"]) < 0.03 for r in rows)


def test_bench_can_count_flops_without_timing():
    rows = run(True, {"shapes": "tiny", "seq_len": 16, "timing": False})
    assert all(r["step_seconds"] is None and r["time_ratio"] is None for r in rows)
    assert rows[1]["flops_ratio"] != 1.0
