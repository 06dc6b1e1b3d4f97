"""Causal-LM fine-tuning data: WikiText-2 as fixed-length token windows, and its perplexity evaluation.

``data.task: wikitext2`` trains on non-overlapping windows of ``data.max_length`` tokens cut from
``wiki.valid.tokens`` (the only non-test split available offline; the quantizers calibrate on the same
file) and evaluates perplexity on the first ``data.eval_limit`` non-overlapping windows of the same
length from ``wiki.test.raw`` — the same windows ``peftkit eval --task wikitext2 --seq-len L
--max-windows N`` scores. Labels are the input ids (the model shifts them), so the loss is the usual
next-token cross-entropy. Files come from ``data.root`` or env PEFTKIT_WIKITEXT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import UserError

LM_TASKS = ("wikitext2",)
TRAIN_FILE = "wiki.valid.tokens"
# Methods checked on a causal LM: LoRA and full on a plain decoder, apiq on a `peftkit quantize` output.
# The others assume an encoder (MEFT's post-norm layers, HiWi's FFN biases) or a classifier head.
LM_METHODS = ("full", "lora", "apiq")


def is_lm_task(name: str) -> bool:
    return name in LM_TASKS


def task_problems(recipe) -> list[str]:
    """How the recipe's model head, method and data options disagree with its data.task (LM or GLUE); the loader
    reports these with every other recipe problem, before any model loads."""
    d, problems = recipe.data, []
    if not is_lm_task(d.task):
        if recipe.model.task_head == "causal_lm":
            problems.append(f"model.task_head: causal_lm needs a language-modelling data.task ({', '.join(LM_TASKS)}), "
                            f"not the GLUE task {d.task!r}; GLUE uses seq_cls")
        return problems
    if recipe.model.task_head != "causal_lm":
        problems.append(f"model.task_head: {recipe.model.task_head!r} does not fit data.task {d.task}, which trains a "
                        f"language model; set it to causal_lm")
    if recipe.method_name not in LM_METHODS:
        problems.append(f"method.name: {recipe.method_name!r} is only wired for GLUE classification; "
                        f"data.task {d.task} works with {', '.join(LM_METHODS)}")
    if d.train_split != "train" or d.eval_split is not None:
        problems.append(f"data.train_split / data.eval_split: GLUE options; {d.task} always trains on {TRAIN_FILE} and "
                        f"evaluates on the test text (remove them)")
    return problems


@dataclass
class LMText:
    """The two texts of an LM task, read up front so a missing file fails before the model loads."""

    root: Path
    train_text: str
    eval_text: str

    @classmethod
    def read(cls, root: str | None) -> "LMText":
        from peftkit.eval.wikitext import TEST_FILE, default_wikitext_root

        base = Path(root or default_wikitext_root()).expanduser()
        texts = []
        for name in (TRAIN_FILE, TEST_FILE):
            path = base / name
            if not path.is_file():
                raise UserError(f"data.task wikitext2 needs {path}, which does not exist. Set data.root (or env "
                                f"PEFTKIT_WIKITEXT) to a directory holding {TRAIN_FILE} and {TEST_FILE} "
                                f"(for this project: ../shared/data/wikitext-2).")
            texts.append(path.read_text(encoding="utf-8"))
        return cls(base, *texts)


def text_windows(tokenizer, text: str, seq_len: int, limit: int | None = None, where: str = "the text"):
    """(n, seq_len) non-overlapping windows from the start of the tokenized text (the tail that does not fill
    a window is dropped); ``limit`` keeps the first n."""
    from peftkit.eval.wikitext import consecutive_windows, token_ids

    ids = token_ids(tokenizer, text)
    if ids.numel() < seq_len:
        raise UserError(f"{where} has {ids.numel()} tokens, fewer than one window of data.max_length {seq_len}; "
                        f"lower data.max_length or use a longer file.")
    return consecutive_windows(ids, seq_len, limit)


def window_rows(windows) -> list[dict]:
    """One training row per window; the trainer shuffles them with its seeded order."""
    return [{"input_ids": w} for w in windows]


def collate_windows(rows: list[dict]) -> dict:
    """All windows have the same length: stack, no padding, no attention mask; labels = inputs."""
    import torch

    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone()}


def make_perplexity_eval_fn(windows):
    """model -> {ppl, nll, tokens, windows, seq_len} on ``windows`` (each scored on its own, no BOS)."""
    from peftkit.eval.perplexity import perplexity_of_windows

    def evaluate(model) -> dict:
        return perplexity_of_windows(model, windows)

    return evaluate
