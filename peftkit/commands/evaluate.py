"""`peftkit eval`: the GLUE table of fine-tuned runs, and WikiText-2 perplexity of language models."""

from __future__ import annotations

import time
from pathlib import Path

from peftkit.errors import UserError


def write_results(payload: dict, model_dirs: list[str], json_path: str | None) -> dict:
    """The table's JSON to ``--json`` and to eval/results-<time>[-N].json of each run directory (never colliding,
    written whole or not at all, never over a file peftkit did not write)."""
    from peftkit.train.rundir import record_written
    from peftkit.utils.atomic import refuse_symlink
    from peftkit.utils.output_paths import unique_result_path, write_result_json

    targets = [Path(json_path)] if json_path else []
    for model_dir in model_dirs:
        if (Path(model_dir) / "final").is_dir():
            refuse_symlink(Path(model_dir) / "eval", "the results folder")
            record_written(Path(model_dir), ["eval"])
            targets.append(unique_result_path(Path(model_dir) / "eval", f"results-{time.strftime('%Y%m%d-%H%M%S')}"))
    for target in targets:
        write_result_json(target, payload, "--json" if json_path and target == Path(json_path) else "result file")
    return payload


def parse_task_spec(spec: str) -> tuple[str, list[str] | None]:
    """'glue' -> ('glue', None); 'glue:sst2,mrpc' -> ('glue', ['sst2', 'mrpc']); 'wikitext2' -> ('wikitext2', None)."""
    suite, _, names = spec.partition(":")
    tasks = [t.strip() for t in names.split(",") if t.strip()] or None
    return suite.strip(), tasks


def evaluate_glue(model_dirs: list[str], tasks: list[str] | None, data_root: str | None, batch_size: int = 128,
                  limit: int | None = None, json_path: str | None = None, trust_remote_code: bool = False) -> dict:
    """Evaluate each model on its own GLUE task (or on ``tasks`` for a plain checkpoint); print and save a table.
    Each run directory keeps its own results file (eval/results-<time>[-N].json: two evaluations never collide)."""
    from peftkit.methods.trained import check_head_fits, load_trained
    from peftkit.tasks.glue import (
        PadCollator,
        get_task,
        load_rows,
        make_eval_fn,
        tokenize_rows,
    )
    from peftkit.utils.output_paths import check_output_file
    from peftkit.utils.tables import format_table

    if json_path:  # refused before any model loads
        json_path = str(check_output_file(json_path, "--json"))
    rows_out = []
    for model_dir in model_dirs:
        model, tokenizer, info = load_trained(model_dir, trust_remote_code)
        own_task = info.get("task")
        wanted = tasks or ([own_task] if own_task else None)
        if not wanted:
            raise UserError(f"{model_dir} does not record its task; name one with --task glue:<task>.")
        for name in wanted:
            task = get_task(name)
            if own_task and name != own_task:
                raise UserError(f"{model_dir} was fine-tuned on {own_task}, not {name}; its head does not fit {name}. "
                                f"Evaluate it with --task glue:{own_task}.")
            if not own_task:  # a plain checkpoint: its config's head must fit the task
                check_head_fits(model, task, model_dir)
            split = task.validation_splits[0]
            rows = load_rows(name, split, data_root, limit)
            data = tokenize_rows(task, rows, tokenizer, info.get("max_length", 128))
            collate = PadCollator(tokenizer.pad_token_id or 0, task.is_regression)
            start = time.perf_counter()
            metrics = make_eval_fn(task, data, collate, batch_size)(model)
            rows_out.append({"model": str(model_dir), "task": name, **{k: round(v, 4) for k, v in metrics.items()},
                             "n": len(rows), "seconds": round(time.perf_counter() - start, 2)})
    scores = [sum(v for k, v in r.items() if k in ("accuracy", "f1", "pearson", "spearman", "matthews_correlation"))
              / max(1, sum(k in ("accuracy", "f1", "pearson", "spearman", "matthews_correlation") for k in r)) for r in rows_out]
    average = sum(scores) / len(scores) if scores else None
    print(format_table(rows_out))
    if average is not None:
        print(f"average (mean of each task's metrics): {average:.4f}")
    import sys

    from peftkit.utils.tables import machine_info

    payload = {"bench": "glue-eval", "suite": "glue", "machine": machine_info(),
               "command": " ".join(["peftkit", *sys.argv[1:]]), "rows": rows_out, "average": average}
    return write_results(payload, model_dirs, json_path)


def run(model_path_or_dir: str, data_root: str | None = None, seq_len: int = 512, max_windows: int | None = None) -> dict:
    """Perplexity of one model on the WikiText-2 test text."""
    from peftkit.methods.trained import load_for_eval
    from peftkit.tasks.causal_lm import evaluate_perplexity
    from peftkit.utils.text_windows import TEST_FILE, default_wikitext_root, read_text

    path = Path(data_root or default_wikitext_root()) / TEST_FILE
    text = read_text(path)
    model, tokenizer = load_for_eval(str(model_path_or_dir))
    result = evaluate_perplexity(model, tokenizer, text, seq_len, max_windows)
    return {"task": "wikitext2", "model": str(model_path_or_dir), "data": str(path), **result}


def run_cli(models: list[str] | str, seq_len: int = 512, max_windows: int | None = None, json_out: str | None = None) -> list[dict]:
    """`peftkit eval --task wikitext2 --model DIR [--model DIR2] [--max-windows N] [--json FILE]`."""
    from peftkit.utils.output_paths import check_output_file

    if json_out:  # refused before any model loads
        json_out = str(check_output_file(json_out, "--json"))
    rows = [run(m, seq_len=seq_len, max_windows=max_windows) for m in ([models] if isinstance(models, str) else models)]
    for row in rows:
        print(f"wikitext2 {row['model']}: ppl {row['ppl']:.3f} (nll {row['nll']:.4f}, {row['windows']} windows x {row['seq_len']} tokens)")
    if json_out:
        from peftkit.utils.output_paths import write_result_json

        write_result_json(json_out, {"task": "wikitext2", "rows": rows}, "--json")
    return rows


def read_labeled(spec: str, limit: int | None):
    """Rows to score: a local file, or a hub dataset ``NAME[:CONFIG]`` (its validation split, else test)."""
    from peftkit.tasks.tabular import FORMATS, Table, hub_splits, read_file, read_hub

    if Path(spec).expanduser().exists() or Path(spec).suffix.lower() in FORMATS:
        table = read_file(spec)
    else:
        name, _, config = spec.partition(":")
        try:
            splits = hub_splits(name, config or None)
        except UserError as e:
            raise UserError(f"--task {spec}: unknown task suite (glue, glue:<task>, wikitext2), no such file, and as "
                            f"a dataset id: {e}") from None
        split = next((s for s in ("validation", "test") if s in splits), None)
        if split is None:
            raise UserError(f"dataset {spec} has neither a validation nor a test split (it has: {', '.join(splits)}).")
        table = read_hub(name, config or None, split)
    return Table(table.rows[:limit], table.where) if limit else table


def evaluate_own(model_dirs: list[str], spec: str, batch_size: int = 128, limit: int | None = None,
                 json_path: str | None = None, trust_remote_code: bool = False) -> dict:
    """Score runs on labeled rows of one's own: classification (accuracy, macro-F1), regression (Pearson, Spearman,
    MSE) and SFT (response-only loss) runs, each reading the rows the way it was trained. Same table and JSON as
    the GLUE evaluation; each run directory keeps its own results file."""
    import sys

    from peftkit.methods.trained import load_trained
    from peftkit.tasks.dataset import (
        RunReading,
        SFTCollator,
        classification_metrics,
        encode_sft,
        logits_of,
        regression_metrics,
        response_loss,
    )
    from peftkit.tasks.glue import PadCollator
    from peftkit.tasks.tabular import require_columns, texts
    from peftkit.utils.output_paths import check_output_file
    from peftkit.utils.tables import format_table, machine_info

    if json_path:  # never the labeled rows themselves
        json_path = str(check_output_file(json_path, "--json", inputs=(spec,)))
    table = read_labeled(spec, limit)  # a bad file fails before any model loads
    rows_out = []
    for model_dir in model_dirs:
        model, tokenizer, info = load_trained(model_dir, trust_remote_code)
        reading = RunReading(info, model.config)
        start = time.perf_counter()
        if reading.task_type == "sft":
            prompt, response = reading.prompt_column, reading.response_column
            require_columns(table, [prompt, response], "the prompt / response columns of the run")
            encoded, _, _ = encode_sft(tokenizer, texts(table, prompt), texts(table, response), reading.max_length)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            metrics = response_loss(model, encoded, SFTCollator(pad), batch_size)
        elif reading.task_type in ("classification", "regression"):
            gold = reading.gold(table)
            regression = reading.task_type == "regression"
            logits = logits_of(model, reading.encode(tokenizer, table), PadCollator(tokenizer.pad_token_id or 0, False),
                               batch_size)
            metrics = (regression_metrics(logits[:, 0].tolist(), gold) if regression else
                       classification_metrics(logits.argmax(-1).tolist(), gold, logits.shape[1]))
        else:
            raise UserError(f"{model_dir} is a {reading.task_type} run; score it with --task wikitext2 or "
                            f"`peftkit generate`.")
        rows_out.append({"model": str(model_dir), "data": table.where,
                         **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
                         "n": len(table.rows), "seconds": round(time.perf_counter() - start, 2)})
    print(format_table(rows_out))
    payload = {"bench": "own-eval", "suite": "dataset", "data": table.where, "machine": machine_info(),
               "command": " ".join(["peftkit", *sys.argv[1:]]), "rows": rows_out}
    return write_results(payload, model_dirs, json_path)
