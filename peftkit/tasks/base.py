"""What a run trains on and how it is scored: the contract between a task and the one run pipeline.

A task is created with its recipe. The pipeline (peftkit/train/pipeline.py) calls, in this order:

* ``recipe_problems(recipe)``   (classmethod) what the task says of the recipe before anything loads;
* ``check_method(method)``       refuse a model family the method does not support, from config.json alone;
* ``read_data()``               read and check the files that need no tokenizer (a bad file fails in a second);
* ``load_tokenizer()``          the tokenizer (a model's, or one trained on the corpus);
* ``load_data(tokenizer)``      rows, collator and evaluation, read and checked before the model loads;
* ``build_model(method, tokenizer)``  the base model with the method applied;
* ``train_args(model, run_dir, log)``  the training options (a task may derive max_steps, e.g. from FLOPs);
* ``save_final(method, model, tokenizer, directory)``  the result a user takes away;
* ``summary(...)``              the task's own figures in metrics.json.

``best_metric`` and ``greater_is_better`` say which evaluation figure selects checkpoints and in which
direction it improves, declared where the metric is.

``peftkit eval`` scores finished runs through the task too (classmethods: no recipe is involved). The command
picks the task whose ``eval_suite`` is the word before ``:`` in ``--task`` (else the own-data task), then calls
``read_eval_data(request)`` once, before any model loads; for each run ``check_run(model_dir, info)`` on its record
(before its weights load), the artifacts layer's loader, and ``evaluate_run(model, tokenizer, info, data, request,
model_dir)``; finally ``eval_report(rows, data, request)``, which prints and returns what is saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence


@dataclass
class EvalRequest:
    """What ``peftkit eval`` was asked: ``--task`` as given, the names after ``glue:``, and the options."""

    spec: str
    names: list[str] | None = None
    data_root: str | None = None
    batch_size: int = 128
    limit: int | None = None
    seq_len: int = 512
    max_windows: int | None = None

    @classmethod
    def parse(cls, spec: str, **options) -> "EvalRequest":
        """'glue' -> names None; 'glue:sst2,mrpc' -> ['sst2', 'mrpc']; 'wikitext2' or a file -> names None."""
        suite, _, names = spec.partition(":")
        return cls(spec, [t.strip() for t in names.split(",") if t.strip()] or None, **options)

    @property
    def suite(self) -> str:
        return self.spec.partition(":")[0].strip()


@dataclass
class TaskData:
    """What the trainer needs of the data, and what the task reports about it."""

    train: Sequence[dict]
    collate: Callable
    eval_fn: Callable | None
    info: dict[str, Any] = field(default_factory=dict)


class Task:
    name: ClassVar[str] = ""
    recipe_kind: ClassVar[str] = "finetune"  # the kind of recipe that names this task
    best_metric: ClassVar[str | None] = None
    greater_is_better: ClassVar[bool] = True
    evaluate_start: ClassVar[bool] = False  # also score the model before any step (reported as <metric>_start)

    # ---- scoring finished runs (`peftkit eval`) --------------------------------------------------
    eval_suite: ClassVar[str | None] = None  # the word of `peftkit eval --task` that selects this task
    eval_head: ClassVar[str] = "seq_cls"  # the head a checkpoint without a peftkit record is loaded with
    eval_results_in_run: ClassVar[bool] = True  # also keep the results in each run directory (eval/)

    def __init__(self, recipe):
        self.recipe = recipe

    @classmethod
    def recipe_problems(cls, recipe) -> list[str]:
        return []

    # ---- the data and the model ----------------------------------------------------------------
    def check_method(self, method) -> None:
        """Refuse a model whose family ``method`` does not support from its config.json alone, before any data is read
        or tokenized (that takes a while for a language model's text). ``build_model`` checks the loaded model again;
        a hub name that is not on this machine is left to it."""
        from types import SimpleNamespace

        from peftkit.models.aliases import resolve_model
        from peftkit.models.load import locate, read_model_config

        name = getattr(self.recipe.model, "name", None)
        if not method.needed() or not name:
            return
        path = Path(locate(resolve_model(name)))
        if (path / "config.json").is_file():
            config = read_model_config(path, name)
            method.check_family(SimpleNamespace(config=config))  # the structure of a model built from it

    def read_data(self) -> None:
        """Read and check what needs no tokenizer, before the (slow) tokenizer and model libraries load."""

    def load_tokenizer(self):
        from peftkit.models.load import load_tokenizer

        m = self.recipe.model
        return load_tokenizer(m.name, m.trust_remote_code)

    def head(self) -> tuple[int | None, str | None]:
        """(num_labels, problem_type) of the task head; (None, None) for language models."""
        return None, None

    def build_model(self, method, tokenizer):
        """The base model with its head (the method's own loader first), checked against data.max_length, with the
        method applied. Called before the run directory exists: a model or option that does not fit fails without
        leaving a half-written run behind."""
        from peftkit.errors import UserError
        from peftkit.models.load import load_model

        r = self.recipe
        num_labels, problem = self.head()
        model = method.load_base(r.model, r.model.task_head, num_labels, problem)
        if model is None:
            model = load_model(r.model.name, r.model.task_head, num_labels, problem, r.model.dtype,
                               r.model.trust_remote_code, r.model.attn_implementation)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and r.data.max_length > limit:
            raise UserError(f"data.max_length {r.data.max_length} exceeds what {r.model.name} allows "
                            f"({limit} positions). Set data.max_length to at most {limit}.")
        method.check_family(model)
        return method.prepare(model)

    def train_args(self, model, run_dir: Path, log):
        return self.recipe.train

    # ---- results -----------------------------------------------------------------------------
    def save_final(self, method, model, tokenizer, directory: Path, task_info: dict) -> None:
        """The method's own format, the tokenizer and peftkit.json (base model, method, options, task)."""
        recipe = self.recipe
        method.save(model, directory)
        tokenizer.save_pretrained(directory)
        from peftkit.config.run_info import RunInfo

        RunInfo(method=recipe.method_name, options=recipe.method.model_dump(mode="json"),
                model=recipe.model.model_dump(mode="json"), **task_info, max_length=recipe.data.max_length).write(directory)

    def summary(self, data: TaskData, final: dict, start: dict | None, model, trained: dict) -> dict:
        return dict(final)

    def describe(self, data: TaskData) -> str:
        """The log line that names what trains on what."""
        return f"{self.recipe.model.name} / {self.name}"

    def final_line(self, final: dict, data: TaskData) -> str:
        return "  ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float))

    # ---- scoring finished runs (classmethods: `peftkit eval` has no recipe) ----------------------------
    @classmethod
    def read_eval_data(cls, request: EvalRequest) -> Any:
        """What every run is scored on, read and checked before any model loads (None: read per run)."""
        return None

    @classmethod
    def check_run(cls, model_dir: str, info) -> None:
        """Refuse a run this evaluation cannot score from its record alone (``info``: its RunInfo, or None for a
        checkpoint without one), before its weights load."""

    @classmethod
    def evaluate_run(cls, model, tokenizer, info, data, request: EvalRequest, model_dir: str) -> list[dict]:
        """The result rows of one loaded run (``info``: its RunInfo, or None) on ``data``."""
        from peftkit.errors import UserError

        raise UserError(f"peftkit eval does not score {cls.name or cls.__name__} runs.")

    @classmethod
    def eval_report(cls, rows: list[dict], data, request: EvalRequest) -> dict:
        """Print the results of every run; return what is saved (to --json and, per run, to its eval/)."""
        from peftkit.utils.tables import format_table

        print(format_table(rows))
        return {"suite": request.suite, "rows": rows}
