"""`peftkit bench latency --set models=...`: merged exports timed against their base, loaded by plain transformers."""

from __future__ import annotations

import pytest

from peftkit.commands.export import export
from peftkit.commands.train import finetune
from peftkit.errors import UserError


@pytest.mark.slow
def test_latency_times_merged_exports_against_the_base(tiny_run_setup, tmp_path):
    from peftkit.bench.latency import run

    recipe = tiny_run_setup("hiwi", out="run-hiwi", max_steps=1, save_every=1, eval_every=1)
    trained = finetune(recipe, [])
    merged = export(str(trained), str(tmp_path / "merged"), True)
    options = {"model": recipe["model"]["name"], "models": [str(merged)], "repeats": 2, "warmup": 1, "batch_size": 2,
               "seq_len": 8, "device": "cpu"}
    rows = run(True, options)
    assert [r["method"] for r in rows] == ["base", "hiwi export (merged)", "base (identical copy)"]
    assert rows[0]["latency_ratio"] == 1.0 and all(r["seconds"] > 0 for r in rows)

    delta = export(str(trained), str(tmp_path / "delta"), False)
    with pytest.raises(UserError, match="not a merged export"):
        run(True, {**options, "models": [str(delta)]})
