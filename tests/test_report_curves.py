"""The curve figures of `peftkit report`: one legend entry per series (seeds of one configuration are one series),
losses of different objectives on different axes, units on every axis, and what the trainer logs plotted."""

import json

import pytest
import yaml

from peftkit import report


def _run(root, name, config, rows):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _log(steps, loss, metric=None, extra=None):
    rows = []
    for s in range(1, steps + 1):
        rows.append({"step": s, "epoch": 0, "loss": loss / s, "lr": 1e-3, "grad_norm": 1.0 / s,
                     "examples_per_second": 10.0, "peak_rss_bytes": 2**30, **(extra or {})})
        if metric and s % 5 == 0:
            rows.append({"step": s, "epoch": 0, "eval": {metric: 0.5 + s / 100}})
    return rows


@pytest.fixture
def figures(monkeypatch):
    """Every figure report saves, by file name, before it is closed."""
    saved = {}
    real = report._save

    def keep(fig, path):
        saved[path.name] = {"titles": [ax.get_title() for ax in fig.axes if ax.get_visible()],
                            "ylabels": [ax.get_ylabel() for ax in fig.axes if ax.get_visible()],
                            "xlabels": [ax.get_xlabel() for ax in fig.axes if ax.get_visible()],
                            "legends": [[t.get_text() for t in legend.get_texts()] for legend in fig.legends],
                            "axis_legends": [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None],
                            "lines": {ax.get_title(): len(ax.get_lines()) for ax in fig.axes}}
        return real(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    return saved


def test_a_grid_gives_one_legend_entry_per_series(tmp_path, figures):
    grid = tmp_path / "grid"
    for row in ("lora", "pafi-r0.001", "full"):
        for seed in (1, 2, 3):
            _run(grid, f"{row}-mrpc-seed{seed}", {"kind": "finetune", "data": {"task": "mrpc"}},
                 _log(20, 0.7, "f1"))
        _run(grid, f"{row}-sst2", {"kind": "finetune", "data": {"task": "sst2"}}, _log(20, 0.7, "accuracy"))
    report.make_report([str(grid)], str(tmp_path / "out"))
    loss = figures["loss_curves.png"]
    assert loss["legends"] == [["full", "lora", "pafi-r0.001"]]  # not one per run, not one per panel
    assert loss["axis_legends"] == []
    assert loss["titles"] == ["mrpc: training loss", "sst2: training loss"]
    assert all("nats" in y for y in loss["ylabels"]) and set(loss["xlabels"]) == {"optimizer step"}
    evals = figures["eval_curves.png"]
    assert evals["legends"] == [["full", "lora", "pafi-r0.001"]]
    assert evals["titles"] == ["mrpc: f1 during training", "sst2: accuracy during training"]
    dynamics = figures["training_dynamics.png"]
    assert dynamics["legends"] == [["full", "lora", "pafi-r0.001"]]
    assert "mrpc: gradient norm before clipping" in dynamics["titles"] and "MiB" in dynamics["ylabels"]
    for name in ("loss_curves.png", "eval_curves.png", "training_dynamics.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(b"\x89PNG")
        assert f"]({name})" in (tmp_path / "out" / "report.md").read_text()


def test_pretraining_objectives_never_share_a_loss_axis(tmp_path, figures):
    runs = tmp_path / "pre"
    for variant in ("mlm", "3ml-self", "3ml-cross"):
        _run(runs, f"pretrain-{variant}-small", {"kind": "pretrain", "mlm": {"variant": variant, "mask_rate": None}},
             [{**row, "eval": {"eval_loss": 3.0, "eval_targets": 100}} if "eval" in row else row
              for row in _log(20, 9.0, "eval_loss")])
    report.make_report([str(runs)], str(tmp_path / "out"))
    loss = figures["loss_curves.png"]
    assert sorted(loss["titles"]) == ["pretraining 3ml-cross: training loss at mask rate 0.5",
                                      "pretraining 3ml-self: training loss at mask rate 0.5",
                                      "pretraining mlm: training loss at mask rate 0.15"]
    assert all(count == 2 for count in loss["lines"].values())  # one series per axis: faint raw + its mean
    evals = figures["eval_curves.png"]  # the held-out loss uses the same masking for all: one shared axis
    assert len(evals["titles"]) == 1 and "same masking" in evals["titles"][0]
    assert evals["legends"] == [["pretrain-3ml-cross-small", "pretrain-3ml-self-small", "pretrain-mlm-small"]]


def test_series_label_strips_task_and_seed():
    run = report.Run("pafi-r0.005-rte-seed7", [], {"task": "rte"})
    assert report.series_label(run) == "pafi-r0.005"
    assert report.series_label(report.Run("lora-minilm-sst2", [], {"task": "sst2"})) == "lora-minilm"
