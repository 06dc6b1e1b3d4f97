"""``train.precision: auto`` on a CPU: decided by timing a bf16 and an fp32 matmul of the model's shapes, once per
machine (cached by CPU model, torch version, threads and shapes); never by CPU flags. The timing function is
replaced by chosen figures here, so nothing depends on this machine's speed."""

import json

import pytest
import torch

from peftkit.utils import env

SHAPES = (4096, 384, 1536)


@pytest.fixture
def timed(monkeypatch, tmp_path):
    """matmul_seconds replaced: seconds per dtype from ``figures`` (settable), every call recorded."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(env, "cpu_bf16_failure", lambda: None)
    monkeypatch.setattr(env, "cpu_model", lambda: "Test CPU A")
    figures = {"fp32": 0.030, "bf16": 0.010}
    calls = []

    def fake_seconds(dtype_name, rows, hidden, intermediate, repeats=3):
        calls.append((dtype_name, rows, hidden, intermediate))
        return figures[dtype_name] * rows / SHAPES[0]

    monkeypatch.setattr(env, "matmul_seconds", fake_seconds)
    return figures, calls, tmp_path / "cache" / env.PRECISION_CACHE_FILE


def test_auto_picks_bf16_where_it_measures_faster_and_says_the_figures(timed):
    figures, calls, _ = timed
    precision, why = env.resolve_precision("auto", SHAPES)
    assert precision == "bf16"
    assert why == "auto: bf16 matmul 3x fp32 at 4096x384x1536 on Test CPU A, measured"
    assert {c[0] for c in calls} == {"fp32", "bf16"} and all(c[2:] == (384, 1536) for c in calls)


def test_auto_threshold_is_1_3x(timed, monkeypatch):
    figures, _, _ = timed
    figures["bf16"] = figures["fp32"] / 1.29
    precision, why = env.resolve_precision("auto", SHAPES)
    assert precision == "fp32" and "1.29x fp32" in why and "needs 1.3x" in why
    monkeypatch.setattr(env, "cpu_model", lambda: "Test CPU B")  # a new cache key: measured again
    figures["bf16"] = figures["fp32"] / 1.31
    assert env.resolve_precision("auto", SHAPES)[0] == "bf16"


def test_a_far_slower_bf16_is_decided_by_the_scout_alone(timed):
    figures, calls, _ = timed
    figures["bf16"] = figures["fp32"] * 100  # an AVX2-only CPU: bf16 ~100x slower
    precision, why = env.resolve_precision("auto", SHAPES)
    assert precision == "fp32" and "0.01x fp32" in why
    assert [c[:2] for c in calls if c[0] == "bf16"] == [("bf16", SHAPES[0] // 8)]  # no full-size bf16 matmul


def test_the_measurement_is_cached_per_cpu_model(timed, monkeypatch):
    figures, calls, cache = timed
    env.resolve_precision("auto", SHAPES)
    measured = len(calls)
    figures["bf16"] = 1.0  # a second measurement would now decide fp32
    precision, why = env.resolve_precision("auto", SHAPES)
    assert len(calls) == measured and precision == "bf16" and why.endswith(", cached")
    assert any(key.startswith("Test CPU A | torch ") for key in json.loads(cache.read_text()))
    monkeypatch.setattr(env, "cpu_model", lambda: "Test CPU B")
    precision, why = env.resolve_precision("auto", SHAPES)
    assert len(calls) > measured and precision == "fp32" and why.endswith("measured; bf16 needs 1.3x")
    env.resolve_precision("auto", (1024, 384, 1536))  # other shapes: another entry
    assert len(json.loads(cache.read_text())) == 3


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"Test CPU A": "fast"}', "\udcff"])
def test_a_corrupt_cache_is_measured_again_and_rewritten(timed, content):
    _, calls, cache = timed
    cache.parent.mkdir(parents=True)
    cache.write_text(content, errors="surrogateescape")
    precision, why = env.resolve_precision("auto", SHAPES)
    assert precision == "bf16" and why.endswith("measured") and calls
    assert list(json.loads(cache.read_text()).values()) == [pytest.approx(3.0)]


def test_failing_bf16_kernels_decide_fp32_without_timing(timed, monkeypatch):
    _, calls, _ = timed
    monkeypatch.setattr(env, "cpu_bf16_failure", lambda: "pack_vnni2 is only supported when avx512 is supported")
    precision, why = env.resolve_precision("auto", SHAPES)
    assert precision == "fp32" and "pack_vnni2" in why and not calls


def test_cpu_flags_do_not_decide(timed, monkeypatch):
    figures, _, _ = timed
    monkeypatch.setattr(env, "cpu_flags", lambda: {"avx2", "avx512_bf16", "amx_bf16", "amx_tile"})
    figures["bf16"] = figures["fp32"]  # AMX flags, but bf16 measured no faster (another process's load, a VM)
    assert env.resolve_precision("auto", SHAPES)[0] == "fp32"


def test_cuda_with_bf16_picks_bf16_without_timing(timed, monkeypatch):
    _, calls, _ = timed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Test GPU")
    assert env.resolve_precision("auto", SHAPES) == ("bf16", "auto: Test GPU supports bf16")
    assert not calls


def test_the_trainer_logs_the_decision_with_the_model_shapes(timed, tmp_path):
    from helpers.tiny import tiny_bert

    from peftkit.config.schema import TrainArgs
    from peftkit.methods import create_method
    from peftkit.train.trainer import Trainer

    _, calls, _ = timed
    method = create_method("lora")
    lines = []
    rows = [{"input_ids": list(range(5 + i)), "labels": 0} for i in range(10)]
    trainer = Trainer(method.prepare(tiny_bert()), method, TrainArgs(precision="auto", batch_size=4),
                      tmp_path / "run", rows, lambda batch: batch, log=lines.append)
    assert trainer.precision == "bf16" and trainer.autocast_dtype == torch.bfloat16
    # tiny_bert: hidden 32, intermediate 64; rows = batch 4 x longest sequence 14
    assert ("bf16", 4 * 14, 32, 64) in calls and ("fp32", 4 * 14, 32, 64) in calls
    assert lines == ["precision bf16 (auto: bf16 matmul 3x fp32 at 56x32x64 on Test CPU A, measured)"]


@pytest.mark.subprocess
@pytest.mark.slow
def test_under_torchrun_every_process_trains_in_the_main_processes_precision(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parent / "precision_auto_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 1 timed bf16 as slower (fp32 on its own); the main process's bf16 holds for both
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["bf16", "bf16"]
