"""Causal-LM text: WikiText-2 as fixed-length token windows, scored by perplexity (lower is better).

``data.task: wikitext2`` trains on non-overlapping windows of ``data.max_length`` tokens cut from
``wiki.valid.tokens`` (the only non-test split available offline; the quantizers calibrate on the same
file) and evaluates perplexity on the first ``data.eval_limit`` non-overlapping windows of the same
length from ``wiki.test.raw`` — the same windows ``peftkit eval --task wikitext2 --seq-len L
--max-windows N`` scores. Labels are the input ids (the model shifts them), so the loss is the usual
next-token cross-entropy. Files come from ``data.root`` or env PEFTKIT_WIKITEXT. The model is also
scored before any step, so each run records how far fine-tuning moved it (``ppl_start`` vs ``ppl``).

The calibration text of ``peftkit quantize`` is this task's text too: its recipe checks live here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import UserError
from peftkit.paths import WIKITEXT_ENV, wikitext_root
from peftkit.tasks.base import Task, TaskData
from peftkit.utils.registry import TASKS
from peftkit.utils.text_windows import (
    TEST_FILE,
    TRAIN_FILE,
    consecutive_windows,
    token_ids,
)


def methods_with_head(head: str) -> list[str]:
    """The methods that declare ``head`` among the task heads they run on (``Method.heads``)."""
    from peftkit.utils.registry import METHODS

    return [entry.name for entry in METHODS.entries() if head in entry.target.heads]


def lm_method_problem(method_name: str, what: str) -> str | None:
    """A recipe problem when the method does not run on a causal LM head, naming those that do."""
    from peftkit.utils.registry import METHODS

    if "causal_lm" in METHODS.get(method_name).heads:
        return None
    return (f"method.name: {method_name!r} is only wired for {', '.join(sorted(METHODS.get(method_name).heads))} "
            f"heads; {what} trains a causal LM, which works with {', '.join(methods_with_head('causal_lm'))}")


@dataclass
class LMText:
    """The two texts of an LM task, read up front so a missing file fails before the model loads."""

    root: Path
    train_text: str
    eval_text: str

    @classmethod
    def read(cls, root: str | None) -> "LMText":
        base = Path(root or wikitext_root()).expanduser()
        texts = []
        for name in (TRAIN_FILE, TEST_FILE):
            path = base / name
            if not path.is_file():
                raise UserError(f"data.task wikitext2 needs {path}, which does not exist. Set data.root (or env "
                                f"PEFTKIT_WIKITEXT) to a directory holding {TRAIN_FILE} and {TEST_FILE}.")
            texts.append(path.read_text(encoding="utf-8"))
        return cls(base, *texts)


def text_windows(tokenizer, text: str, seq_len: int, limit: int | None = None, where: str = "the text"):
    """(n, seq_len) non-overlapping windows from the start of the tokenized text (the tail that does not fill
    a window is dropped); ``limit`` keeps the first n."""
    ids = token_ids(tokenizer, text)
    if ids.numel() < seq_len:
        raise UserError(f"{where} has {ids.numel()} tokens, fewer than one window of data.max_length {seq_len}; "
                        f"lower data.max_length or use a longer file.")
    return consecutive_windows(ids, seq_len, limit)


def collate_windows(rows: list[dict]) -> dict:
    """All windows have the same length: stack, no padding, no attention mask; labels = inputs."""
    import torch

    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone()}


def perplexity_of_windows(model, windows) -> dict:
    """Perplexity over (n, L) token windows; each window is scored on its own (L - 1 predictions)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            ids = window[None].to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            total += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    model.train(was_training)
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1])}


def evaluate_perplexity(model, tokenizer, text: str, seq_len: int = 512, max_windows: int | None = None,
                        skip_windows: int = 0) -> dict:
    windows = consecutive_windows(token_ids(tokenizer, text), seq_len, max_windows, skip_windows)
    return perplexity_of_windows(model, windows)


@TASKS.register("wikitext2", help="Causal-LM fine-tuning on WikiText-2, perplexity on its test text.")
class CausalLMText(Task):
    name = "wikitext2"
    best_metric = "ppl"
    greater_is_better = False
    evaluate_start = True
    eval_suite = "wikitext2"
    eval_head = "causal_lm"  # also a quantize output, an adapter directory, an alias or a hub id
    eval_results_in_run = False

    @classmethod
    def recipe_problems(cls, recipe) -> list[str]:
        """How the recipe's model head, method and data options disagree with a language-modelling task."""
        d, problems = recipe.data, []
        if recipe.model.task_head != "causal_lm":
            problems.append(f"model.task_head: {recipe.model.task_head!r} does not fit data.task {d.task}, which trains "
                            f"a language model; set it to causal_lm")
        problems += filter(None, [lm_method_problem(recipe.method_name, f"data.task {d.task}")])
        if d.train_split != "train" or d.eval_split is not None:
            problems.append(f"data.train_split / data.eval_split: GLUE options; {d.task} always trains on {TRAIN_FILE} "
                            f"and evaluates on the test text (remove them)")
        return problems

    def check_method(self, method) -> None:
        """Also: apiq's base must be a `peftkit quantize` output (its loader says so only after the text is read).
        Not a recipe problem: a shipped apiq recipe names the directory its quantize recipe writes, which may not
        exist yet."""
        from peftkit.quant.checkpoint import is_quantized_dir

        name = self.recipe.model.name
        if self.recipe.method_name == "apiq" and not is_quantized_dir(name):
            raise UserError(f"method apiq fine-tunes a `peftkit quantize` output directory, and model.name {name} is "
                            f"not one (no quantization.json / model.safetensors there). Run `peftkit quantize` first "
                            f"and set model.name to the directory it writes.")
        super().check_method(method)

    def load_data(self, tokenizer) -> TaskData:
        d = self.recipe.data
        texts = LMText.read(d.root)
        train = text_windows(tokenizer, texts.train_text, d.max_length, d.limit, str(texts.root / TRAIN_FILE))
        evaluation = text_windows(tokenizer, texts.eval_text, d.max_length, d.eval_limit, str(texts.root / TEST_FILE))
        return TaskData([{"input_ids": w} for w in train], collate_windows,
                        lambda model: perplexity_of_windows(model, evaluation),
                        {"train_windows": len(train), "eval_windows_count": len(evaluation), "data_root": str(texts.root)})

    def describe(self, data) -> str:
        d = self.recipe.data
        return (f"{self.recipe.model.name} / {d.task}; {data.info['train_windows']} training windows and "
                f"{data.info['eval_windows_count']} evaluation windows of {d.max_length} tokens from {data.info['data_root']}")

    def save_final(self, method, model, tokenizer, directory, task_info=None) -> None:
        super().save_final(method, model, tokenizer, directory,
                           {"task": self.recipe.data.task, "num_labels": None, "problem_type": None})

    def summary(self, data, final, start, model, trained) -> dict:
        r = self.recipe
        tokens_per_step = r.train.batch_size * r.train.grad_accum * trained["world_size"] * r.data.max_length
        return {"ppl": final["ppl"], "nll": final["nll"], "ppl_start": start["ppl"], "nll_start": start["nll"],
                "eval_windows": final["windows"], "eval_seq_len": final["seq_len"], "eval_tokens": final["tokens"],
                "train_windows": data.info["train_windows"], "train_tokens": trained["steps"] * tokens_per_step,
                "dtype": str(next(model.parameters()).dtype), "data_root": data.info["data_root"],
                **quantized_start_point(r.model.name)}

    def final_line(self, final, data) -> str:
        return f"ppl {final['ppl']:.4f}  nll {final['nll']:.4f}  ({final['windows']} windows x {final['seq_len']} tokens)"

    # ---- `peftkit eval --task wikitext2`: perplexity on the test text ------------------------------------
    @classmethod
    def read_eval_data(cls, request) -> tuple[Path, str]:
        from peftkit.utils.text_windows import read_text

        path = Path(request.data_root or wikitext_root()) / TEST_FILE
        return path, read_text(path)

    @classmethod
    def check_run(cls, model_dir, info) -> None:
        head = info.model.get("task_head") if info is not None else None
        if info is not None and head != "causal_lm":
            raise UserError(f"{model_dir} was fine-tuned with a {head} head; perplexity needs a causal LM "
                            f"(a run with data.task wikitext2, a quantize output directory or a language model).")

    @classmethod
    def evaluate_run(cls, model, tokenizer, info, data, request, model_dir) -> list[dict]:
        import torch

        if torch.cuda.is_available():
            model = model.cuda()
        path, text = data
        result = evaluate_perplexity(model, tokenizer, text, request.seq_len, request.max_windows)
        return [{"task": "wikitext2", "model": str(model_dir), "data": str(path), **result}]

    @classmethod
    def eval_report(cls, rows, data, request) -> dict:
        for row in rows:
            print(f"wikitext2 {row['model']}: ppl {row['ppl']:.3f} (nll {row['nll']:.4f}, {row['windows']} windows x "
                  f"{row['seq_len']} tokens)")
        return {"task": "wikitext2", "rows": rows}


def quantized_start_point(model_name: str) -> dict:
    """Which quantizer made the base (from its quantization.json), so results can name the start point."""
    from peftkit.quant.checkpoint import is_quantized_dir, read_info

    if not is_quantized_dir(model_name):
        return {"quant_method": None, "bits": None}
    info = read_info(model_name)
    return {"quant_method": info["method"], "bits": info["bits"], "group_size": info["group_size"],
            "quant_seconds": info.get("seconds")}


@TASKS.register("calibration", help="The calibration text of `peftkit quantize` (WikiText-2 token windows).")
class CalibrationText(Task):
    """Not trained on: what a quantize recipe's calibration and model sections must satisfy."""

    name = "calibration"
    recipe_kind = "quantize"

    @classmethod
    def recipe_problems(cls, recipe) -> list[str]:
        from peftkit.quant.checks import model_problems

        c = recipe.calib
        if c.root is None and not os.environ.get(WIKITEXT_ENV):
            problems = [f"calib.root: null, and env {WIKITEXT_ENV} is not set either: set calib.root (or the "
                        f"variable) to the directory holding {c.file}"]
        else:
            path = Path(c.root or wikitext_root()).expanduser() / c.file
            problems = [] if path.is_file() else [
                f"calib.root/calib.file: {path} does not exist (set calib.root or env {WIKITEXT_ENV})"]
        return problems + model_problems(recipe.quant, recipe.model.name)
