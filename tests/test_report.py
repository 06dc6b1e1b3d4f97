"""peftkit report: reads runs, quantized dirs and bench JSONs; writes readable PNGs and a summary that cites them."""

import json

import pytest

from peftkit.errors import UserError
from peftkit.report import collect, human_bytes, make_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def glue_payload():
    rows = [{"method": m, "task": "sst2", "metric": "accuracy", "value": v, "trainable_pct": pct,
             "stored_bytes": stored, "saved_bytes": saved, "peak_rss_bytes": rss, "step_seconds": 0.25,
             "latency_ratio": lat}
            for m, v, pct, stored, saved, rss, lat in [("full", 0.80, 100.0, 90_000_000, 5 * 2**20, 6 * 2**20, 1.0),
                                                        ("lora", 0.83, 1.4, 1_300_000, 4 * 2**20, 5 * 2**20, 1.3),
                                                        ("meft1", 0.78, 0.9, 900_000, 2**19, 2**20, 1.1)]]
    rows.append({"method": "lora", "task": "average", "metric": "mean of sst2 accuracy", "value": 0.99})  # no run
    return {"bench": "glue", "command": "peftkit bench glue --quick --json glue.json", "rows": rows,
            "notes": ["quick settings: max_steps 30"]}


def peers_payload():
    return {"bench": "peers", "command": "peftkit bench peers --quick", "rows": [
        {"comparison": "LoRA training throughput", "peftkit": 30.0, "peer": 25.0, "ratio": 1.2,
         "unit": "examples/second, higher is better"}]}


@pytest.fixture
def inputs(tiny_run_setup, tmp_path):
    from peftkit.commands.train import finetune

    runs = tmp_path / "runs"
    for method in ("lora", "full"):
        finetune(tiny_run_setup(method=method, out=f"runs/{method}-sst2", max_steps=4, log_every=1), [])
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.7}) + "\n")
    quant = tmp_path / "quant-rtn"
    quant.mkdir()
    (quant / "errors.json").write_text(json.dumps({"blocks": [{"index": i, "rel_output_error": 0.01 * (i + 1)}
                                                              for i in range(4)], "layers": []}))
    (quant / "quantization.json").write_text(json.dumps({"method": "rtn", "bits": 2}))
    (tmp_path / "glue.json").write_text(json.dumps(glue_payload()))
    (tmp_path / "peers.json").write_text(json.dumps(peers_payload()))
    return tmp_path


def test_collect_finds_every_kind_of_input(inputs):
    sources = collect([str(inputs / "runs"), str(inputs / "quant-rtn"), str(inputs / "glue.json")])
    assert sorted(r.name for r in sources.runs) == ["full-sst2", "lora-sst2", "unfinished"]
    finished = {r.name: r for r in sources.runs if r.metrics}
    assert finished["lora-sst2"].method == "lora" and finished["lora-sst2"].task == "sst2"
    assert [row["step"] for row in finished["lora-sst2"].log if "loss" in row] == [1, 2, 3, 4]
    assert list(sources.quantized) == ["rtn 2-bit (quant-rtn)"]
    assert [r["method"] for r in sources.bench_rows("glue")] == ["full", "lora", "meft1", "lora"]


def test_report_writes_all_plots_and_a_summary_that_shows_them(inputs):
    out = inputs / "report"
    summary = make_report([str(inputs / p) for p in ("runs", "quant-rtn", "glue.json", "peers.json")], str(out))
    names = ("loss_curves.png", "memory.png", "accuracy_vs_trainable.png", "quant_error_per_block.png")
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name  # a real, non-empty picture
    text = summary.read_text()
    for name in names:
        assert f"]({name})" in text
    assert "best is **lora** at 0.830" in text  # the best sst2 row of the glue bench, not the first one
    assert "**average**" not in text  # the task-average row is a summary of trained cells, not a cell
    baseline = json.loads((inputs / "runs" / "lora-sst2" / "metrics.json").read_text())["baseline"]["accuracy"]
    assert f"the trivial baseline (always the training-set majority class) scores {baseline:.3f}" in text
    assert "| lora | 0.830 | 1.4% | 1.2 MiB | 4.0 MiB | 5.0 MiB | 250 ms | 1.30x |" in text
    assert "peftkit 30, peer 25, **ratio 1.200** (examples/second, higher is better): **peftkit better**" in text
    assert "peftkit bench glue --quick --json glue.json" in text and "quick settings: max_steps 30" in text
    assert "| rtn 2-bit (quant-rtn) | 4 | 0.0100 | 0.0400 | 0.0400 (block 3) |" in text


def test_runs_alone_give_accuracy_from_their_metrics(inputs):
    out = inputs / "only-runs"
    text = make_report([str(inputs / "runs")], str(out)).read_text()
    assert (out / "accuracy_vs_trainable.png").is_file() and (out / "loss_curves.png").is_file()
    assert not (out / "memory.png").exists() and not (out / "quant_error_per_block.png").exists()
    metrics = json.loads((inputs / "runs" / "lora-sst2" / "metrics.json").read_text())
    assert f"| lora-sst2 | lora | sst2 | accuracy {metrics['accuracy']:.3f} |" in text


def test_bad_inputs_say_what_to_give(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds nothing to report"):
        make_report([str(tmp_path / "empty")], str(tmp_path / "out"))
    with pytest.raises(UserError, match="does not exist"):
        make_report([str(tmp_path / "missing")], str(tmp_path / "out"))


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(3 * 2**20) == "3.0 MiB"
    assert human_bytes(None) == ""


def test_cli_report_command(inputs):
    from typer.testing import CliRunner

    from peftkit.cli import app

    result = CliRunner().invoke(app, ["report", str(inputs / "glue.json"), "--out", str(inputs / "cli-out")])
    assert result.exit_code == 0, result.output
    assert (inputs / "cli-out" / "report.md").is_file() and (inputs / "cli-out" / "memory.png").is_file()
    result = CliRunner().invoke(app, ["report", str(inputs / "nowhere")])
    assert result.exit_code == 2
