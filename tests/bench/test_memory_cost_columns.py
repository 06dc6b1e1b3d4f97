"""bench memory: every main row has its step's process CPU seconds beside the wall seconds, and MFU from the row's own
FLOPs, step time and the stated machine limit."""

import pytest


def test_memory_rows_have_cpu_seconds_and_mfu(tmp_path, monkeypatch):
    from helpers.tiny import save_tiny_classifier

    from peftkit.bench import harness, memory

    monkeypatch.setattr(memory, "METHODS", ("full", "lora", "lora+gc"))
    monkeypatch.setattr(memory, "recipe_contenders", lambda: [])
    # the fresh-process peaks are bench costs.py's own (tested there); here every row only needs one
    monkeypatch.setattr(memory, "fresh_peaks", lambda spec, settings, label, labels: {
        name: {"peak_rss_bytes": 1} for name in labels})
    monkeypatch.setattr(memory, "matmul_peak_flops", lambda dtype_name: 1e9)
    model = save_tiny_classifier(tmp_path / "tiny")
    cpu_clock = iter(0.125 * i for i in range(1_000_000))  # every timed step reads one step of 0.125 s of CPU
    monkeypatch.setattr(harness.time, "process_time", cpu_clock.__next__)
    rows = {row["method"]: row for row in memory.main_rows({"batch": 2, "seq": 8, "repeats": 2, "rss_steps": 1},
                                                           str(model))}
    assert list(rows) == ["full", "lora", "lora+gc"]
    for name, row in rows.items():
        assert row["step_seconds"] > 0 and row["step_cpu_seconds"] == 0.125
        # MFU = the method's FLOPs without recomputation (a "+gc" row: its plain row's) / wall seconds / peak
        useful = rows[name.split("+")[0]]["step_flops"]
        assert row["mfu"] == pytest.approx(useful / row["step_seconds"] / 1e9)
    assert rows["lora+gc"]["step_flops"] > rows["lora"]["step_flops"]  # the recomputed forward is counted there


def test_cpu_seconds_are_recorded_for_every_timed_call():
    from peftkit.bench.harness import cpu_timed, time_interleaved

    spans = {"a": [], "b": []}
    work = lambda: sum(i * i for i in range(2000))  # noqa: E731
    time_interleaved({name: cpu_timed(work, spans[name]) for name in spans}, repeats=3, warmup=1, sync=lambda: None)
    assert [len(s) for s in spans.values()] == [4, 4] and all(t >= 0 for s in spans.values() for t in s)
