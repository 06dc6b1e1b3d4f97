"""Smoke test of the latency bench on a tiny saved model: row shape, every contender, finite ratios."""

import math

import torch
from helpers.tiny import save_tiny_classifier

from peftkit.bench import latency


def test_latency_rows_on_a_tiny_model(tmp_path):
    model_dir = save_tiny_classifier(tmp_path / "tiny")
    rows = latency.run(True, {"model": str(model_dir), "batch_size": 2, "seq_len": 8, "repeats": 3, "warmup": 1})
    assert [r["method"] for r in rows] == ["base", "pafi (merged)", "hiwi-weight (merged)", "hiwi-bias (merged)",
                                           "lora (unmerged)", "base (identical copy)"]
    for row in rows:
        assert set(row) == {"method", "latency_ratio", "seconds"}
        assert math.isfinite(row["latency_ratio"]) and row["latency_ratio"] > 0 and row["seconds"] > 0
    assert rows[0]["latency_ratio"] == 1.0


def test_contenders_are_real_merges():
    from helpers.tiny import tiny_bert

    base = tiny_bert()
    with torch.no_grad():  # pretrained biases are non-zero; from_config zero-initialises them
        for name, p in base.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
    contenders = latency.build_contenders(base, {"rho": 0.05, "r": 4, "lora_r": 4})
    plain = {n for n, _ in base.named_parameters()}
    for name, model in contenders.items():
        if name.endswith("(merged)"):  # the base architecture again, with changed weights
            assert {n for n, _ in model.named_parameters()} == plain
            assert any(not torch.equal(p, base.get_parameter(n)) for n, p in model.named_parameters()
                       if not n.startswith("classifier.")), name
    assert any("lora_B" in n for n, _ in contenders["lora (unmerged)"].named_parameters())
    copy_ = contenders["base (identical copy)"]  # the noise reference really is the unmodified base
    assert all(torch.equal(p, base.get_parameter(n)) for n, p in copy_.named_parameters())
