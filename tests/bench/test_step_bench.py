"""bench step: the FLOP formula of its docstring is what torch counts, the rows hold what the docstring promises."""

import pytest

from peftkit.bench import step


def tiny_config_model():
    from peftkit.bench.costs import build_model

    config = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "vocab_size": 128, "max_position_embeddings": 64}
    return build_model({"model": "config", "config": config, "seed": 0})


def test_the_formula_is_the_counted_flops_of_a_full_step():
    from peftkit.bench.costs import make_batch, prepare
    from peftkit.bench.harness import count_step_flops

    base = tiny_config_model()
    batch = make_batch(base.config.vocab_size, 3, 10)
    method_plugin, model = prepare("full", base)
    model.train()
    counted = count_step_flops(method_plugin, model, batch)
    assert counted == step.formula_flops(base.config, 3, 10)


def test_speedup_target_follows_the_matmul_kind_and_ratio():
    assert step.speedup_target("cpu-amx-bf16", 8.0) == 3.0
    assert step.speedup_target("cpu-avx512-bf16", 2.5) == 2.0
    assert step.speedup_target("cpu-avx2", 0.05) is None


def test_rows_give_each_precision_its_own_peak_and_what_auto_picks(tiny_run_setup, monkeypatch):
    from peftkit.utils import env

    recipe = tiny_run_setup()
    peaks = {("fp32", "wall"): 1e9, ("bf16", "wall"): 4e9, ("fp32", "cpu"): 2e9, ("bf16", "cpu"): 8e9}
    monkeypatch.setattr(env, "matmul_peak_flops", lambda name, clock="wall": peaks[(name, clock)])
    monkeypatch.setattr(env, "resolve_precision", lambda precision, shapes: ("bf16", f"auto: shapes {shapes}"))
    rows = step.run(True, {"model": recipe["model"]["name"], "seq": 8, "batch": 2, "repeats": 1, "warmup": 0})
    fp32, bf16, speed, auto = rows
    for row, name in ((fp32, "fp32"), (bf16, "bf16")):
        assert row["precision"] == name and row["step_flops"] == row["formula_flops"] > 0
        assert row["mfu"] == pytest.approx(row["step_flops"] / row["step_seconds"] / peaks[(name, "wall")])
        assert row["mfu_cpu"] == pytest.approx(row["step_flops"] / row["step_cpu_seconds"] / peaks[(name, "cpu")])
    assert speed["speedup"] == pytest.approx(fp32["step_seconds"] / bf16["step_seconds"])
    assert speed["matmul_peak_ratio"] == pytest.approx(4.0)
    assert auto["precision"] == "bf16" and "shapes (16, " in auto["why"]  # rows = batch 2 x 8 tokens
    assert rows.extra["cpu_model"] == env.cpu_model() and rows.extra["matmul_kind"] == env.matmul_kind()
