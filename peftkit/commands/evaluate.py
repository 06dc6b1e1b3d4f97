"""`peftkit eval`: score finished runs, dispatched through the task that the --task word names (GLUE table, WikiText-2
perplexity, or labeled rows of one's own); the artifacts layer loads each run."""

from __future__ import annotations

import time
from pathlib import Path


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


def eval_task(suite: str):
    """The task class whose ``eval_suite`` is ``suite`` (glue, wikitext2); any other --task names labeled rows of
    one's own (a file or a dataset id), which the own-data task scores."""
    from peftkit.config.schema import OWN_DATA_TASK
    from peftkit.utils.registry import TASKS

    for entry in TASKS.entries():
        if entry.target.eval_suite == suite:
            return entry.target
    return TASKS.get(OWN_DATA_TASK)


def evaluate(spec: str, model_dirs: list[str] | str, data_root: str | None = None, batch_size: int = 128,
             limit: int | None = None, seq_len: int = 512, max_windows: int | None = None,
             json_path: str | None = None, trust_remote_code: bool = False) -> dict:
    """Score each run on ``spec`` (`peftkit eval --task SPEC --model DIR ...`); print the results and save them to
    ``json_path`` and, where the task keeps them there, to each run directory. --json is refused, and the data
    read, before any model loads."""
    from functools import partial

    from peftkit.artifacts.load import load_run
    from peftkit.tasks.base import EvalRequest
    from peftkit.utils.output_paths import check_output_file

    model_dirs = [model_dirs] if isinstance(model_dirs, str) else list(model_dirs)
    request = EvalRequest.parse(spec, data_root=data_root, batch_size=batch_size, limit=limit, seq_len=seq_len,
                                max_windows=max_windows)
    task = eval_task(request.suite)
    if json_path:  # never the labeled rows themselves
        json_path = str(check_output_file(json_path, "--json", inputs=(spec,)))
    data = task.read_eval_data(request)
    rows = []
    for model_dir in model_dirs:
        model, tokenizer, info = load_run(model_dir, trust_remote_code, task.eval_head,
                                          check=partial(task.check_run, model_dir))
        rows += task.evaluate_run(model, tokenizer, info, data, request, model_dir)
    payload = task.eval_report(rows, data, request)
    return write_results(payload, model_dirs if task.eval_results_in_run else [], json_path)
