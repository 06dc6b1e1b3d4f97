"""bench glue: the (method x task) grid on a tiny model; every cost column comes from its own measurement."""

import json
from pathlib import Path

import pytest

from peftkit.bench import costs, glue, grid
from peftkit.bench.harness import write_bench


@pytest.fixture
def tiny_grid(tiny_run_setup, tmp_path):
    recipe = tiny_run_setup()  # builds the tiny model + data root and sets PEFTKIT_DATA_DIR
    options = {"model": recipe["model"]["name"], "methods": "lora,full", "tasks": ["sst2"], "max_steps": 2,
               "limit": 16, "eval_limit": 8, "max_length": 16, "batch_size": 4, "latency_batch": 2,
               "latency_repeats": 3, "step_repeats": 2, "rss": False, "work_dir": str(tmp_path / "work")}
    return options


@pytest.mark.slow
def test_grid_rows_have_every_column_and_trace_to_the_runs(tiny_grid, tmp_path):
    rows = glue.run(True, tiny_grid)
    assert [(r["method"], r["task"]) for r in rows] == [("lora", "sst2"), ("full", "sst2")]
    by = {r["method"]: r for r in rows}
    for r in rows:
        metrics = json.loads((tmp_path / "work" / f"{r['method']}-sst2" / "metrics.json").read_text())
        assert r["metric"] == "accuracy" and r["value"] == metrics["accuracy"]
        assert r["trivial_baseline"] == metrics["baseline"]["accuracy"]
        assert r["steps"] == 2 == metrics["steps"]
        assert r["saved_bytes"] > 0 and r["step_seconds"] > 0 and r["latency_ratio"] > 0
        assert r["latency_model"] == "merged"  # lora and full both merge into the plain architecture
    # full fine-tuning trains and stores everything, LoRA a small part of it
    assert by["full"]["trainable_pct"] == pytest.approx(100.0)
    assert by["lora"]["trainable_pct"] < 100.0
    assert by["lora"]["stored_bytes"] < by["full"]["stored_bytes"]
    # stored bytes are the model files only: adding up final/ minus the tokenizer files gives the same figure
    final = tmp_path / "work" / "full-sst2" / "final"
    weights = sum(p.stat().st_size for p in final.iterdir() if p.name not in costs.TOKENIZER_FILES)
    assert by["full"]["stored_bytes"] == weights
    assert (final / "tokenizer_config.json").exists()
    # both keep every Linear's input for backward (full for the weight gradients, LoRA for A's), so the two
    # activation counts are close; neither can be zero in a training forward
    assert 0.5 < by["lora"]["saved_bytes"] / by["full"]["saved_bytes"] < 2.0
    # the plots and the summary come with the table
    report = tmp_path / "work" / "report"
    for name in ("report.md", "loss_curves.png", "memory.png", "accuracy_vs_trainable.png"):
        assert (report / name).is_file(), name
    assert "| lora |" in (report / "report.md").read_text()
    # the quick settings are stated in the JSON
    payload = write_bench("glue", rows, tmp_path / "glue.json")
    written = json.loads((tmp_path / "glue.json").read_text())
    assert written["notes"] == payload["notes"] and "max_steps 2" in written["notes"][0]
    assert written["rows"][0]["method"] == "lora"


def test_methods_without_a_recipe_borrow_the_lora_schedule(tmp_path):
    s = glue.settings(True, {"model": "m"})
    raw = grid.recipe_for("bitfit", "sst2", s, tmp_path / "r")
    assert raw["method"] == {"name": "bitfit"}
    assert raw["train"]["max_steps"] == s.max_steps and raw["data"]["limit"] == s.limit
    assert raw["output"] == {"dir": str(tmp_path / "r"), "overwrite": True}
    lora = grid.recipe_for("lora", "sst2", s, tmp_path / "r")
    assert lora["method"]["name"] == "lora" and lora["train"]["lr"] == raw["train"]["lr"]


def test_peak_memory_comes_from_a_fresh_process_per_row_with_its_recipe_options(monkeypatch):
    calls = []
    monkeypatch.setattr("peftkit.bench.costs.peak_memory_in_fresh_process",
                        lambda spec: calls.append(spec) or {"peak_rss_bytes": 7, "peak_cuda_bytes": None})
    s = glue.settings(True, {"model": "m", "batch_size": 4})
    peaks = glue.peak_memory(["lora", "full", "pafi-r0.001"], s)
    assert {row: p["peak_rss_bytes"] for row, p in peaks.items()} == {"lora": 7, "full": 7, "pafi-r0.001": 7}
    assert [c["method"] for c in calls] == ["lora", "full", "pafi"]
    assert calls[2]["method_options"]["rho"] == 0.001  # a row's own recipe options reach the fresh process
    assert all(c["batch"] == 4 and c["seq"] == s.max_length for c in calls)


def test_a_row_is_a_recipe_stem_and_seeds_apply_to_the_small_tasks_only(tmp_path):
    s = glue.settings(False, {"model": "m", "seeds": "1,2", "tasks": ["sst2", "rte"]})
    raw = grid.recipe_for("pafi-r0.01", "rte", s, tmp_path / "r", seed=2)
    assert raw["method"]["name"] == "pafi" and raw["method"]["rho"] == 0.01 and raw["train"]["seed"] == 2
    plan = grid.planned_runs(["pafi-r0.01"], s, tmp_path)
    assert [(task, seed, d.name) for _, task, seed, d in plan] == [
        ("sst2", None, "pafi-r0.01-sst2"), ("rte", 1, "pafi-r0.01-rte-seed1"), ("rte", 2, "pafi-r0.01-rte-seed2")]


def test_seeded_cells_report_the_mean_and_sample_std(tmp_path):
    plan = []
    for seed, acc in ((1, 0.5), (2, 0.7)):
        run = tmp_path / f"lora-rte-seed{seed}"
        (run / "final").mkdir(parents=True)
        (run / "final" / "adapter_model.safetensors").write_bytes(b"x" * 10)
        (run / "metrics.json").write_text(json.dumps({"accuracy": acc, "trainable_pct": 1.0, "steps": 3, "seed": seed,
                                                       "train_seconds": 2.0, "n_eval": 4, "baseline": {"accuracy": 0.5}}))
        plan.append(("lora", "rte", seed, run))
    r = grid.collect_results(plan)[("lora", "rte")]
    assert r["value"] == pytest.approx(0.6) and r["value_std"] == pytest.approx(0.1414, abs=1e-4)
    assert r["values"] == [0.5, 0.7] and r["seeds"] == [1, 2] and r["stored_bytes"] == 10


def test_finetune_off_reports_finished_runs_and_needs_one_per_cell(tmp_path):
    s = glue.settings(True, {"finetune": False})
    plan = [("lora", "rte", 1, tmp_path / "lora-rte-seed1"), ("lora", "rte", 2, tmp_path / "lora-rte-seed2")]
    with pytest.raises(FileNotFoundError, match="no finished run"):
        grid.run_finetunes(plan, s, tmp_path)
    (tmp_path / "lora-rte-seed1").mkdir()
    (tmp_path / "lora-rte-seed1" / "metrics.json").write_text("{}")
    assert grid.run_finetunes(plan, s, tmp_path) == plan[:1]  # the unfinished second seed is left out


def test_every_cell_gets_its_first_seed_before_any_second(tmp_path):
    s = glue.settings(False, {"seeds": [1, 2], "tasks": ["sst2", "rte"]})
    plan = grid.planned_runs(["a", "b"], s, tmp_path)
    assert [d.name for *_, d in plan] == ["a-sst2", "a-rte-seed1", "b-sst2", "b-rte-seed1", "a-rte-seed2", "b-rte-seed2"]


def test_apiq_is_left_out_by_default():
    assert "apiq" not in grid.methods_to_run(glue.settings(True, {}))
    assert grid.methods_to_run(glue.settings(True, {"methods": "lora, full"})) == ["lora", "full"]


def test_stored_bytes_ignores_tokenizer_files(tmp_path):
    (tmp_path / "adapter.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "vocab.txt").write_bytes(b"y" * 50)
    (tmp_path / "peftkit.json").write_bytes(b"{}")
    assert costs.stored_bytes(Path(tmp_path)) == 100


@pytest.mark.slow
def test_parallel_jobs_give_the_same_metrics_as_in_process_runs(tiny_grid, tmp_path):
    in_process = {r["method"]: r["value"] for r in glue.run(True, {**tiny_grid, "report": False, "costs": False})}
    parallel = glue.run(True, {**tiny_grid, "report": False, "costs": False, "jobs": 2,
                               "work_dir": str(tmp_path / "parallel")})
    assert {r["method"]: r["value"] for r in parallel} == in_process  # seeded training: same numbers either way
    assert all(r["step_seconds"] is None and r["saved_bytes"] is None for r in parallel)
    logs = sorted(p.name for p in (tmp_path / "parallel" / "logs").iterdir())
    assert logs == ["full-sst2.log", "lora-sst2.log"]
    # a second pass with finetune=missing finds every run done and starts nothing
    again = glue.run(True, {**tiny_grid, "report": False, "costs": False, "jobs": 2, "finetune": "missing",
                            "work_dir": str(tmp_path / "parallel")})
    assert [r["value"] for r in again] == [r["value"] for r in parallel]


def test_a_row_can_override_train_keys_and_a_search_runs_each_rate(tmp_path):
    s = glue.settings(False, {"model": "m", "tasks": ["rte"], "methods": ["lora", "pafi-r0.01"],
                              "lr_search": {"pafi-r0.01": [1e-3, 3e-4]}})
    rows = grid.methods_to_run(s)
    assert rows == ["lora", "pafi-r0.01@lr=0.001", "pafi-r0.01@lr=0.0003"]
    raw = grid.recipe_for(rows[2], "rte", s, tmp_path / "r")
    assert raw["method"]["rho"] == 0.01 and raw["train"]["lr"] == 3e-4  # the stem's recipe, the row's rate
    train = grid.recipe_for("lora@lr=5e-4,warmup_ratio=0.1", "rte", s, tmp_path / "r")["train"]
    assert train["lr"] == 5e-4 and train["warmup_ratio"] == 0.1
    assert [d.name for *_, d in grid.planned_runs(rows, s, tmp_path)] == [
        "lora-rte", "pafi-r0.01-lr0.001-rte", "pafi-r0.01-lr0.0003-rte"]
    with pytest.raises(ValueError, match="stem@key=value"):
        grid.split_row("lora@lr")


def test_the_selected_row_keeps_the_best_rate_per_task_with_its_grid():
    def row(method, task, value):
        return {"method": method, "task": task, "value": value}

    rows = [row("full", "rte", 0.6), row("pafi@lr=0.001", "rte", 0.55), row("pafi@lr=0.003", "rte", 0.62),
            row("pafi@lr=0.001", "mrpc", 0.88), row("pafi@lr=0.003", "mrpc", 0.85)]
    picked = {r["task"]: r for r in grid.selected_rows(rows, {"pafi": [1e-3, 3e-3]})}
    assert picked["rte"]["method"] == "pafi" and picked["rte"]["lr"] == 3e-3 and picked["rte"]["value"] == 0.62
    assert picked["mrpc"]["lr"] == 1e-3 and picked["mrpc"]["lr_grid"] == {"0.001": 0.88, "0.003": 0.85}


def test_searching_a_row_outside_the_grid_is_a_settings_error():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="lr_search: hiwi is not a row of the grid"):
        glue.GlueSettings(methods=["full", "pafi"], lr_search={"hiwi": [1e-3]})
    glue.GlueSettings(lr_search={"hiwi": [1e-3]})  # the default rows include hiwi


@pytest.mark.slow
def test_a_learning_rate_search_runs_end_to_end(tiny_grid, tmp_path):
    rows = glue.run(True, {**tiny_grid, "methods": ["lora"], "lr_search": {"lora": [1e-4, 1e-2]}, "latency_repeats": 1,
                           "step_repeats": 1, "report": False})
    assert [r["method"] for r in rows] == ["lora@lr=0.0001", "lora@lr=0.01", "lora"]
    tried, selected = rows[:2], rows[2]
    for r in tried:  # each rate trained with its own learning rate, in its own run dir
        recipe = (tmp_path / "work" / grid.run_dir_name(r["method"] + "-sst2") / "config.yaml").read_text()
        assert f"lr: {grid.split_row(r['method'])[1]['lr']}" in recipe
    assert selected["lr_grid"] == {"0.0001": tried[0]["value"], "0.01": tried[1]["value"]}
    assert selected["value"] == max(r["value"] for r in tried) and selected["lr"] in (1e-4, 1e-2)
    assert tried[0]["saved_bytes"] == tried[1]["saved_bytes"] == selected["saved_bytes"] > 0  # costs once per stem


def test_a_search_on_search_seeds_runs_only_the_best_rate_on_the_other_seeds(tmp_path):
    s = glue.settings(False, {"model": "m", "tasks": ["rte", "sst2"], "methods": ["full", "pafi"], "seeds": [1, 2, 3],
                              "seed_tasks": ["rte"], "search_seeds": [1], "lr_search": {"pafi": [1e-3, 3e-3]}})
    rows = grid.methods_to_run(s)
    first = [(row, task, seed) for row, task, seed, _ in grid.planned_runs(rows, s, tmp_path)]
    # the unsearched row runs every seed, the rates only the search seed; sst2 is not a seed task
    assert sorted(first) == sorted([("full", "rte", 1), ("full", "rte", 2), ("full", "rte", 3), ("full", "sst2", None),
                                    ("pafi@lr=0.001", "rte", 1), ("pafi@lr=0.003", "rte", 1),
                                    ("pafi@lr=0.001", "sst2", None), ("pafi@lr=0.003", "sst2", None)])
    searched = {("full", "rte"): {"value": 0.6}, ("full", "sst2"): {"value": 0.9},
                ("pafi@lr=0.001", "rte"): {"value": 0.55}, ("pafi@lr=0.003", "rte"): {"value": 0.62},
                ("pafi@lr=0.001", "sst2"): {"value": 0.88}, ("pafi@lr=0.003", "sst2"): {"value": 0.85}}
    second = grid.more_seeds_of_the_best_rates(searched, s, tmp_path)
    assert [(row, task, seed, d.name) for row, task, seed, d in second] == [
        ("pafi@lr=0.003", "rte", 2, "pafi-lr0.003-rte-seed2"), ("pafi@lr=0.003", "rte", 3, "pafi-lr0.003-rte-seed3")]
    # after the other seeds the best rate's mean may fall below another rate's: the choice stays the search's
    rows_out = [{"method": "pafi@lr=0.001", "task": "rte", "value": 0.55},
                {"method": "pafi@lr=0.003", "task": "rte", "value": 0.50}]
    picked = grid.selected_rows(rows_out, s.lr_search, {cell: r["value"] for cell, r in searched.items()})
    assert picked[0]["lr"] == 3e-3 and picked[0]["value"] == 0.50
    assert picked[0]["lr_grid"] == {"0.001": 0.55, "0.003": 0.62}
    assert grid.more_seeds_of_the_best_rates(searched, s.model_copy(update={"search_seeds": None}), tmp_path) == []


def test_search_seeds_must_be_seeds_of_a_search():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="search_seeds: set lr_search"):
        glue.GlueSettings(seeds=[1, 2], search_seeds=[1])
    with pytest.raises(ValidationError, match=r"search_seeds: \[5\] are not in seeds"):
        glue.GlueSettings(seeds=[1, 2], search_seeds=[5], lr_search={"hiwi": [1e-3]})
    glue.GlueSettings(seeds=[1, 2], search_seeds=[1], lr_search={"hiwi": [1e-3]})


def test_the_average_row_is_the_mean_of_the_tasks_and_of_each_seed():
    rows = [{"method": "full", "task": "rte", "metric": "accuracy", "value": 0.6, "seeds": [1, 2], "values": [0.5, 0.7]},
            {"method": "full", "task": "mrpc", "metric": "f1", "value": 0.8, "seeds": [1, 2], "values": [0.9, 0.7]},
            {"method": "pafi", "task": "rte", "metric": "accuracy", "value": 0.55, "lr": 1e-3},
            {"method": "pafi", "task": "mrpc", "metric": "f1", "value": 0.85, "lr": 3e-3},
            {"method": "lora", "task": "rte", "metric": "accuracy", "value": 0.5},  # lora lacks mrpc: no average
            # a rate that ran three seeds on rte and one on mrpc: no average that would mix them
            {"method": "bitfit", "task": "rte", "metric": "accuracy", "value": 0.6, "seeds": [1, 2], "values": [0.5, 0.7]},
            {"method": "bitfit", "task": "mrpc", "metric": "f1", "value": 0.8}]
    averages = {r["method"]: r for r in grid.average_rows(rows, ["rte", "mrpc"])}
    assert set(averages) == {"full", "pafi"}
    assert averages["full"]["value"] == pytest.approx(0.7) and averages["full"]["task"] == "average"
    assert averages["full"]["values"] == pytest.approx([0.7, 0.7]) and averages["full"]["value_std"] == pytest.approx(0)
    assert averages["pafi"]["value"] == pytest.approx(0.7) and "value_std" not in averages["pafi"]
    assert averages["pafi"]["lr"] == {"rte": 1e-3, "mrpc": 3e-3}
    assert averages["full"]["metric"] == "mean of rte accuracy, mrpc f1"
    assert grid.average_rows(rows, ["rte"]) == []


def test_settings_are_one_typed_object_with_the_quick_or_full_values_filled_in():
    quick = glue.settings(True, {"model": "m", "seeds": "1,2", "max_steps": None})
    assert isinstance(quick, glue.GlueSettings)
    assert quick.model == "m" and quick.seeds == [1, 2]  # given: the user's, a comma list typed as ints
    assert quick.max_steps == glue.QUICK["max_steps"] and quick.tasks == glue.QUICK["tasks"]  # None: the quick value
    assert quick.batch_size == glue.DEFAULTS["batch_size"] and quick.finetune is True
    full = glue.settings(False, {})
    assert full.max_steps is None and full.tasks == glue.FULL["tasks"] and full.rss_steps == glue.FULL["rss_steps"]
    assert glue.settings(True, quick) == quick  # a filled-in object passes through unchanged
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_steps"):
        glue.settings(True, {"max_steps": 0})  # the same ranges as `--set`
