"""The quant bench end to end on a tiny LLaMA: one row per method and bit width plus the fp row."""



import pytest
from helpers.quant import write_model_dir, write_wikitext  # noqa: E402


def test_rows_have_the_promised_fields(tmp_path, monkeypatch):
    from peftkit.bench.quant import run

    model_dir = write_model_dir(tmp_path / "model")
    monkeypatch.setenv("PEFTKIT_WIKITEXT", str(write_wikitext(tmp_path / "wt", words=2000)))
    rows = run(True, {"model": str(model_dir), "group_size": 16, "bits": [2, None], "ranks": [4], "calib_windows": 4,
                      "calib_seq_len": 16, "ppl_windows": 2, "ppl_seq_len": 16, "error_windows": 2,
                      "methods": ["rtn", "nf", "loftq", "apiq-lw", "apiq-bw"], "step_memory": False})
    assert [(r["method"], r["bits"]) for r in rows] == [("fp", 16)] + [(m, b) for b in (2, None) for m in
                                                                       ("rtn", "nf", "loftq", "loftq", "apiq-lw", "apiq-bw")]
    for row in rows:
        assert set(row) >= {"method", "bits", "group_size", "lora_r", "rel_output_error", "ppl", "seconds",
                            "bits_per_weight", "model_bytes", "lora_bytes"}
    assert [r["loftq_iters"] for r in rows if r["method"] == "loftq"] == [1, 5, 1, 5]
    fp = rows[0]
    for row in rows[7:]:  # bits null = no quantization, B = 0: exactly the fp model
        assert row["rel_output_error"] < 1e-6 and abs(row["ppl"] - fp["ppl"]) < 1e-6 * fp["ppl"]
    assert all(r["rel_output_error"] > 0 for r in rows[1:7])


def test_budgets_and_the_gptq_row(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from peftkit.bench.quant import run

    model_dir = write_model_dir(tmp_path / "model")
    monkeypatch.setenv("PEFTKIT_WIKITEXT", str(write_wikitext(tmp_path / "wt", words=2000)))
    rows = run(True, {"model": str(model_dir), "group_size": 16, "bits": [2], "ranks": [4, 8], "calib_windows": 4,
                      "calib_seq_len": 16, "ppl_windows": 2, "ppl_seq_len": 16, "error_windows": 2,
                      "methods": ["rtn", "gptq"]})
    assert [(r["method"], r["lora_r"]) for r in rows] == [("fp", 0), ("rtn", 4), ("rtn", 8), ("gptq", 0)]
    # straight from the architecture: every projection (out, in) of every block, the rest in fp16
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    shapes = [tuple(p.shape) for n, p in model.named_parameters() if ".layers." in n and p.ndim == 2]
    n_weights = sum(o * i for o, i in shapes)
    rest = sum(p.numel() for n, p in model.named_parameters() if not (".layers." in n and p.ndim == 2))
    quant = sum(o * i * 2 // 8 + 2 * (o * i // 16) + (o * i // 16) * 2 // 8 for o, i in shapes)  # codes, fp16 scales, 2-bit zeros
    assert rows[0]["model_bytes"] == 2 * (n_weights + rest) and rows[0]["bits_per_weight"] == 16
    for row in rows[1:]:
        lora = sum(4 * row["lora_r"] * (o + i) for o, i in shapes)  # fp32 A and B
        assert row["model_bytes"] == quant + 2 * rest and row["lora_bytes"] == lora
        assert row["bits_per_weight"] == pytest.approx(8 * (quant + lora) / n_weights, abs=1e-4)
    assert rows[3]["bits_per_weight"] == pytest.approx(2 + 16 / 16 + 2 / 16, abs=1e-4)  # GPTQ: no LoRA
    assert rows[3]["rel_output_error"] > 0 and rows[3]["ppl"] > 0


@pytest.mark.slow
def test_step_memory_columns_come_from_the_saved_packed_model(tmp_path, monkeypatch):
    from peftkit.bench.quant import run

    model_dir = write_model_dir(tmp_path / "model", hidden=256)
    monkeypatch.setenv("PEFTKIT_WIKITEXT", str(write_wikitext(tmp_path / "wt", words=2000)))
    rows = run(True, {"model": str(model_dir), "group_size": 32, "bits": [2], "ranks": [4], "calib_windows": 4,
                      "calib_seq_len": 16, "ppl_windows": 2, "ppl_seq_len": 16, "error_windows": 2,
                      "methods": ["apiq-bw"]})
    row = rows[1]
    # 2-bit codes + float16 scales/zeros per 32 weights vs float32: the projections shrink ~12x; embeddings and
    # norms (float32 -> bfloat16) 2x
    assert row["packed_model_bytes"] < 0.5 * row["fp32_model_bytes"]
    assert row["model_bytes_ratio"] == row["packed_model_bytes"] / row["fp32_model_bytes"]
    assert 0 < row["packed_train_peak_bytes"] and 0 < row["fp32_train_peak_bytes"]
