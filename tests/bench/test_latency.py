"""The latency bench on a tiny saved model: row shape, every contender, finite ratios; the merged contenders are
real merges (a merged LoRA gives the unmerged LoRA's logits in the base architecture), the Houlsby adapters sit after
the attention and FFN output projections (checked against a straight-line recomputation of a BERT layer's two
sub-blocks), and the noise reference is the unmodified base."""

import math

import torch
from helpers.tiny import save_tiny_classifier

from peftkit.bench import latency


def test_latency_rows_on_a_tiny_model(tmp_path):
    model_dir = save_tiny_classifier(tmp_path / "tiny")
    rows = latency.run(True, {"model": str(model_dir), "batch_size": 2, "seq_len": 8, "repeats": 3, "warmup": 1})
    assert [r["method"] for r in rows] == ["base", "pafi (merged)", "hiwi-weight (merged)", "hiwi-bias (merged)",
                                           "lora (unmerged)", "lora (merged)", "houlsby-adapter (unmerged)",
                                           "base (identical copy)"]
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
    contenders = latency.build_contenders(base, {"rho": 0.05, "r": 4, "lora_r": 4, "adapter_r": 4})
    plain = {n for n, _ in base.named_parameters()}
    for name, model in contenders.items():
        if name.endswith("(merged)"):  # the base architecture again, with changed weights
            assert {n for n, _ in model.named_parameters()} == plain
            assert any(not torch.equal(p, base.get_parameter(n)) for n, p in model.named_parameters()
                       if not n.startswith("classifier.")), name
    assert any("lora_B" in n for n, _ in contenders["lora (unmerged)"].named_parameters())
    copy_ = contenders["base (identical copy)"]  # the noise reference really is the unmodified base
    assert all(torch.equal(p, base.get_parameter(n)) for n, p in copy_.named_parameters())
    ids = torch.randint(5, 60, (2, 7))
    with torch.no_grad():
        lora, merged = contenders["lora (unmerged)"].eval(), contenders["lora (merged)"].eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, lora(input_ids=ids).logits, rtol=0, atol=1e-5)
        houlsby = contenders["houlsby-adapter (unmerged)"].eval()
        assert not torch.allclose(houlsby(input_ids=ids).logits, base.eval()(input_ids=ids).logits)


def test_houlsby_adapters_follow_the_attention_and_ffn_projections():
    """One BERT layer recomputed by hand: LN(x + P(c) + A(P(c))) after attention, LN(a + Q(h) + B(Q(h))) after the
    FFN, with P, Q the layer's pretrained output projections and A, B its two adapters."""
    from helpers.tiny import tiny_bert

    torch.manual_seed(0)
    model = latency.add_houlsby_adapters(tiny_bert().eval(), r=3)
    layer = model.bert.encoder.layer[1]
    adapters = [m for n, m in model.named_modules() if n.endswith(".adapter")]
    assert len(adapters) == 2 * 2  # two per layer
    with torch.no_grad():
        for a in adapters:
            a.up.weight.normal_(std=0.1)
        x, c = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
        out = layer.attention.output
        proj, adapter = out.dense.projection, out.dense.adapter
        def bottleneck(ad, y):
            return ad.up(torch.nn.functional.gelu(ad.down(y)))
        expected = out.LayerNorm(x + proj(c) + bottleneck(adapter, proj(c)))
        torch.testing.assert_close(out(c, x), expected)
        ffn = layer.output
        h = layer.intermediate(x)
        q, b = ffn.dense.projection, ffn.dense.adapter
        torch.testing.assert_close(ffn(h, x), ffn.LayerNorm(x + q(h) + bottleneck(b, q(h))))
        assert not torch.allclose(bottleneck(b, q(h)), torch.zeros(()))  # the adapter does contribute
