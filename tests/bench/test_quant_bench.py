"""The quant bench end to end on a tiny LLaMA: one row per method and bit width plus the fp row."""



from helpers.quant import write_model_dir, write_wikitext  # noqa: E402


def test_rows_have_the_promised_fields(tmp_path, monkeypatch):
    from peftkit.bench.quant import run

    model_dir = write_model_dir(tmp_path / "model")
    monkeypatch.setenv("PEFTKIT_WIKITEXT", str(write_wikitext(tmp_path / "wt", words=2000)))
    rows = run(True, {"model": str(model_dir), "group_size": 16, "bits": [2, 16], "lora_r": 4, "calib_windows": 4,
                      "calib_seq_len": 16, "ppl_windows": 2, "ppl_seq_len": 16, "error_windows": 2})
    assert [(r["method"], r["bits"]) for r in rows] == [("fp", 16)] + [(m, b) for b in (2, 16) for m in
                                                                       ("rtn", "nf", "loftq", "apiq-lw", "apiq-bw")]
    for row in rows:
        assert set(row) >= {"method", "bits", "group_size", "rel_output_error", "ppl", "seconds"}
    fp = rows[0]
    for row in rows[6:]:  # 16 bits = no quantization, B = 0: exactly the fp model
        assert row["rel_output_error"] < 1e-6 and abs(row["ppl"] - fp["ppl"]) < 1e-6 * fp["ppl"]
    assert all(r["rel_output_error"] > 0 for r in rows[1:6])
