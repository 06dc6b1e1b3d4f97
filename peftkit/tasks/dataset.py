"""Your own data: a local file or a hub dataset as classification, regression, causal-LM or SFT.

A finetune recipe with ``data.train_file`` (or ``data.dataset_name``) and no GLUE ``data.task`` runs this task.
What it learns is ``data.task_type``:

* classification  one or two text columns -> a class; labels are class names or integers. The names become
                  the model's ``id2label``/``label2id`` (sorted, so negative/positive -> 0/1). Accuracy and
                  macro-F1; checkpoints are selected on accuracy.
* regression      text -> a number. Pearson (selects checkpoints), Spearman, MSE.
* causal-lm       a text column, joined (EOS between rows) and cut into windows of ``data.max_length`` tokens;
                  perplexity on the validation rows' windows.
* sft             prompt and response columns. With a tokenizer that has a chat template the pair is a user turn
                  and an assistant turn of it; without one, the prompt followed by the response and EOS. The loss
                  is taken on the response tokens only (labels -100 on the prompt and on padding); evaluation is
                  the response-only loss and its perplexity.

With ``data.packing: true`` several causal-lm / sft rows share one training row without seeing each other
(peftkit/tasks/packing.py); evaluation is the same as without it.

Validation rows come from ``data.validation_file``, else the dataset's validation split, else a fixed-seed share
(``data.validation_fraction``) of the training rows. Rows longer than ``data.max_length`` are truncated and
counted in the log line that opens the run.
"""

from __future__ import annotations

import math

from peftkit.errors import UserError
from peftkit.tasks.base import Task, TaskData
from peftkit.tasks.tabular import (
    Table,
    class_labels,
    format_problem,
    hub_splits,
    infer_text_columns,
    label_ids,
    numeric_labels,
    read_file,
    read_hub,
    require_columns,
    split_off,
    texts,
)
from peftkit.utils.registry import TASKS

LM_TYPES = ("causal-lm", "sft")
HEAD_OF_TYPE = {"classification": "seq_cls", "regression": "seq_cls", "causal-lm": "causal_lm", "sft": "causal_lm"}


def task_type_of(recipe) -> str:
    """data.task_type, or what the recipe implies: sft with prompt/response columns, causal-lm with a causal-LM
    head, else classification."""
    d = recipe.data
    if d.task_type:
        return d.task_type
    if d.prompt_column or d.response_column:
        return "sft"
    return "causal-lm" if recipe.model.task_head == "causal_lm" else "classification"


# ---- reading the two sides ----------------------------------------------------------------------
def read_sides(d) -> tuple[Table, Table, str]:
    """(train, validation, how the validation rows were chosen), with data.limit / data.eval_limit applied."""
    if d.train_file:
        train = read_file(d.train_file)
        validation = read_file(d.validation_file) if d.validation_file else None
    else:
        train = read_hub(d.dataset_name, d.dataset_config_name, d.train_split)
        validation = read_file(d.validation_file) if d.validation_file else None
        if validation is None:
            names = hub_splits(d.dataset_name, d.dataset_config_name)
            split = d.eval_split or ("validation" if "validation" in names else None)
            if split is not None:
                validation = read_hub(d.dataset_name, d.dataset_config_name, split)
    if validation is None:
        kept, held = split_off(train.rows, d.validation_fraction)
        train, validation = Table(kept, train.where), Table(held, f"{train.where} (held-out rows)")
        how = f"{len(held)} held-out training rows (validation_fraction {d.validation_fraction})"
    else:
        how = validation.where
    if d.limit:
        train = Table(train.rows[: d.limit], train.where)
    if d.eval_limit:
        validation = Table(validation.rows[: d.eval_limit], validation.where)
    return train, validation, how


# ---- encoding ------------------------------------------------------------------------------------
def encode_texts(tokenizer, columns: list[list[str]], max_length: int) -> tuple[list[dict], int]:
    """Token ids of single texts or pairs, truncated to max_length; and how many rows were longer."""
    full = tokenizer(*columns, truncation=False)["input_ids"]
    over = sum(len(ids) > max_length for ids in full)
    enc = tokenizer(*columns, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(columns[0]))], over


def sft_example(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one prompt/response pair; labels are -100 except on the response tokens."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if whole.startswith(head):
            p = tokenizer(head, add_special_tokens=False)["input_ids"]
            r = tokenizer(whole[len(head):], add_special_tokens=False)["input_ids"]
            return p + r, [-100] * len(p) + r
    p = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=True)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    return p + r, [-100] * len(p) + r


def prompt_text(tokenizer, prompt: str) -> str:
    """What the model is given for a prompt: the chat template's user turn and generation prompt when the tokenizer
    has one, else the prompt and a newline. Generation uses the same text as training."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + "\n"


def encode_sft(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> tuple[list[dict], int, int]:
    """Encoded rows, how many were longer than max_length (cut at the end), and how many were dropped because
    not one response token was left after the cut."""
    rows, over, dropped = [], 0, 0
    for prompt, response in zip(prompts, responses):
        ids, labels = sft_example(tokenizer, prompt, response)
        if len(ids) > max_length:
            over += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == -100 for label in labels[1:]):  # the first label is never predicted
            dropped += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
    return rows, over, dropped


class SFTCollator:
    """Pad input ids with the pad token, labels with -100, and give the attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = [r["input_ids"] + [self.pad_token_id] * (width - len(r["input_ids"])) for r in rows]
        labels = [r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]
        mask = [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def lm_windows(tokenizer, rows: list[str], seq_len: int, where: str, with_lengths: bool = False):
    """The rows' tokens joined with EOS between them, cut into non-overlapping windows of seq_len; with
    ``with_lengths`` also the length of each row in that stream (its EOS included)."""
    import torch

    from peftkit.utils.text_windows import consecutive_windows

    stream: list[int] = []
    lengths: list[int] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for ids in tokenizer(rows, add_special_tokens=False)["input_ids"]:
        stream += ids + eos
        lengths.append(len(ids) + len(eos))
    if len(stream) < seq_len:
        raise UserError(f"{where} has {len(stream)} tokens, fewer than one window of data.max_length {seq_len}; "
                        f"lower data.max_length or give more rows.")
    windows = consecutive_windows(torch.tensor(stream, dtype=torch.long), seq_len)
    return (windows, lengths) if with_lengths else windows


# ---- scores --------------------------------------------------------------------------------------
def classification_metrics(predictions, references, num_labels: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(references, predictions)),
            "macro_f1": float(f1_score(references, predictions, average="macro", labels=list(range(num_labels)),
                                       zero_division=0))}


def regression_metrics(predictions, references) -> dict[str, float]:
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    p, r = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
    mse = float(np.mean((p - r) ** 2))
    if len(p) < 2 or np.std(p) == 0 or np.std(r) == 0:  # a correlation of a constant is undefined
        return {"pearson": 0.0, "spearman": 0.0, "mse": mse}
    return {"pearson": float(pearsonr(p, r)[0]), "spearman": float(spearmanr(p, r)[0]), "mse": mse}


def logits_of(model, rows: list[dict], collate, batch_size: int):
    """(n, num_labels) float logits of tokenized rows, in order, in eval mode."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                batch = collate(rows[start : start + batch_size])
                batch.pop("labels", None)
                out.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def response_loss(model, rows: list[dict], collate, batch_size: int) -> dict:
    """Mean cross-entropy over the response tokens of SFT rows (the labels that are not -100), and its perplexity."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size]).items()}
                labels = batch.pop("labels")
                logits = model(**batch, use_cache=False).logits.float()
                total += F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                                         reduction="sum").item()
                count += int((labels[:, 1:] != -100).sum())
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


# ---- the task ------------------------------------------------------------------------------------
@TASKS.register("dataset", help="Your own data (data.train_file or data.dataset_name): classification, regression, "
                                "causal-lm or sft.")
class OwnData(Task):
    """Creating it gives the subclass of the recipe's task type; each declares its own best metric."""

    name = "dataset"
    task_type = ""

    def __new__(cls, recipe):
        if cls is OwnData:
            cls = TYPES[task_type_of(recipe)]
        return super().__new__(cls)

    @classmethod
    def recipe_problems(cls, recipe) -> list[str]:
        from peftkit.tasks.causal_lm import lm_method_problem

        d, m, problems = recipe.data, recipe.model, []
        kind = task_type_of(recipe)
        if not d.train_file and not d.dataset_name:
            problems.append("data.train_file / data.dataset_name: data.task dataset needs one of them (a local "
                            ".csv/.tsv/.json/.jsonl/.parquet file, or a hub dataset id in datasets' cache)")
        if d.train_file and d.dataset_name:
            problems.append("data.dataset_name: give either data.train_file or data.dataset_name, not both")
        if d.dataset_config_name and not d.dataset_name:
            problems.append("data.dataset_config_name: only means something with data.dataset_name")
        for key in ("train_file", "validation_file"):
            value = getattr(d, key)
            if value and format_problem(value):
                problems.append(f"data.{key}: {format_problem(value)}")
        if d.train_file and (d.eval_split is not None or d.train_split != "train"):
            problems.append("data.train_split / data.eval_split: splits of data.dataset_name; with data.train_file "
                            "give data.validation_file instead")
        if d.root is not None:
            problems.append("data.root: the GLUE / WikiText directory; your own data is read from data.train_file "
                            "(remove data.root)")
        if m.task_head != HEAD_OF_TYPE[kind]:
            problems.append(f"model.task_head: data.task_type {kind} trains with a {HEAD_OF_TYPE[kind]} head, not "
                            f"{m.task_head}; set model.task_head: {HEAD_OF_TYPE[kind]}")
        if kind == "sft" and d.text_columns:
            problems.append("data.text_columns: sft reads data.prompt_column and data.response_column (remove it)")
        if kind != "sft" and (d.prompt_column or d.response_column):
            problems.append(f"data.prompt_column / data.response_column: only for data.task_type sft, not {kind}")
        if kind == "causal-lm" and d.text_columns and len(d.text_columns) > 1:
            problems.append("data.text_columns: causal-lm trains on one text column")
        if kind in LM_TYPES:
            problems += filter(None, [lm_method_problem(recipe.method_name, f"data.task_type {kind}")])
        elif d.packing:
            problems.append(f"data.packing: only for data.task_type causal-lm or sft; this recipe trains {kind} "
                            f"(one sequence, one label per row); remove data.packing")
        return problems

    def __init__(self, recipe):
        super().__init__(recipe)
        self.info: dict = {}

    def load_tokenizer(self):
        tokenizer = super().load_tokenizer()
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # decoders: pad with EOS, as the model config is set to
        return tokenizer

    def build_model(self, method, tokenizer):
        model = super().build_model(method, tokenizer)
        if self.recipe.data.packing:
            from peftkit.tasks.packing import check_documents_stay_apart

            check_documents_stay_apart(model, self.recipe.model.name)
        return model

    def describe(self, data) -> str:
        i = data.info
        line = (f"{self.recipe.model.name} / {self.task_type} on {i['train_source']}: {i['n_train']} training rows, "
                f"{i['n_eval']} validation rows ({i['validation']})")
        if i.get("longer_train") or i.get("longer_eval"):
            line += (f"; rows longer than data.max_length {self.recipe.data.max_length} (truncated): "
                     f"{i.get('longer_train', 0)} training, {i.get('longer_eval', 0)} validation")
        if i.get("dropped_train") or i.get("dropped_eval"):
            line += (f"; rows without a response token left after the cut (dropped): {i.get('dropped_train', 0)} "
                     f"training, {i.get('dropped_eval', 0)} validation")
        if i.get("packed_rows"):
            line += f"; packed into {i['packed_rows']} training rows of at most {self.recipe.data.max_length} tokens"
        return line

    def record(self) -> dict:
        """What peftkit.json keeps so predict / eval / generate read new rows the way training read these."""
        d = self.recipe.data
        return {"task": self.name, "task_type": self.task_type, "label_column": d.label_column}

    def save_final(self, method, model, tokenizer, directory, task_info=None) -> None:
        num_labels, problem = self.head()
        super().save_final(method, model, tokenizer, directory,
                           {**self.record(), "num_labels": num_labels, "problem_type": problem})

    def summary(self, data, final, start, model, trained) -> dict:
        out = {**final, "task_type": self.task_type, **data.info}
        if start:
            out.update({f"{k}_start": v for k, v in start.items() if isinstance(v, float)})
        return out

    # ---- `peftkit eval --task FILE|DATASET`: labeled rows of one's own -------------------------------
    @classmethod
    def read_eval_data(cls, request) -> Table:
        """The labeled rows, read before any model loads (a bad file fails first)."""
        return read_labeled(request.spec, request.limit)

    @classmethod
    def evaluate_run(cls, model, tokenizer, info, data: Table, request, model_dir) -> list[dict]:
        """Classification (accuracy, macro-F1), regression (Pearson, Spearman, MSE) and SFT (response-only loss)
        runs, each reading the rows the way it was trained."""
        import time

        from peftkit.tasks.glue import PadCollator

        table = data
        reading = RunReading(info, model.config)
        start = time.perf_counter()
        if reading.task_type == "sft":
            prompt, response = reading.prompt_column, reading.response_column
            require_columns(table, [prompt, response], "the prompt / response columns of the run")
            encoded, _, _ = encode_sft(tokenizer, texts(table, prompt), texts(table, response), reading.max_length)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            metrics = response_loss(model, encoded, SFTCollator(pad), request.batch_size)
        elif reading.task_type in ("classification", "regression"):
            gold = reading.gold(table)
            regression = reading.task_type == "regression"
            logits = logits_of(model, reading.encode(tokenizer, table), PadCollator(tokenizer.pad_token_id or 0, False),
                               request.batch_size)
            metrics = (regression_metrics(logits[:, 0].tolist(), gold) if regression else
                       classification_metrics(logits.argmax(-1).tolist(), gold, logits.shape[1]))
        else:
            raise UserError(f"{model_dir} is a {reading.task_type} run; score it with --task wikitext2 or "
                            f"`peftkit generate`.")
        return [{"model": str(model_dir), "data": table.where,
                 **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
                 "n": len(table.rows), "seconds": round(time.perf_counter() - start, 2)}]

    @classmethod
    def eval_report(cls, rows, data: Table, request) -> dict:
        import sys

        from peftkit.utils.tables import format_table, machine_info

        print(format_table(rows))
        return {"bench": "own-eval", "suite": "dataset", "data": data.where, "machine": machine_info(),
                "command": " ".join(["peftkit", *sys.argv[1:]]), "rows": rows}


def read_labeled(spec: str, limit: int | None) -> Table:
    """Rows to score: a local file, or a hub dataset ``NAME[:CONFIG]`` (its validation split, else test)."""
    from pathlib import Path

    from peftkit.tasks.tabular import FORMATS

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


class _Labeled(OwnData):
    """Classification and regression: text columns in, one head output per class (or one score)."""

    def _read(self, tokenizer):
        d = self.recipe.data
        train, validation, how = read_sides(d)
        require_columns(train, [d.label_column], "data.label_column")
        self.text_columns = list(d.text_columns or infer_text_columns(train, {d.label_column}))
        require_columns(train, self.text_columns, "data.text_columns")
        require_columns(validation, self.text_columns + [d.label_column], "data.text_columns / data.label_column")
        encoded = []
        for table, side in ((train, "train"), (validation, "eval")):
            rows, over = encode_texts(tokenizer, [texts(table, c) for c in self.text_columns], d.max_length)
            encoded.append(rows)
            self.info[f"longer_{side}"] = over
        self.info.update({"n_train": len(train.rows), "n_eval": len(validation.rows), "train_source": train.where,
                          "validation": how, "text_columns": self.text_columns})
        return train, validation, encoded

    def record(self) -> dict:
        return {**super().record(), "text_columns": self.text_columns}


class Classification(_Labeled):
    task_type = "classification"
    best_metric = "accuracy"

    def head(self):
        return len(self.labels), "single_label_classification"

    def load_data(self, tokenizer) -> TaskData:
        from peftkit.tasks.glue import PadCollator

        d = self.recipe.data
        train, validation, (train_rows, eval_rows) = self._read(tokenizer)
        train_labels = class_labels(train, d.label_column)
        self.labels = sorted(set(train_labels))
        if len(self.labels) < 2:
            raise UserError(f"{train.where}, column {d.label_column!r}: every training row has the label "
                            f"{self.labels[0]!r}; classification needs at least two classes.")
        train_ids = label_ids(train, train_labels, self.labels)
        eval_ids = label_ids(validation, class_labels(validation, d.label_column), self.labels)
        for rows, ids in ((train_rows, train_ids), (eval_rows, eval_ids)):
            for row, label in zip(rows, ids):
                row["labels"] = label
        collate = PadCollator(tokenizer.pad_token_id or 0, regression=False)
        batch_size, k = self.recipe.train.eval_batch_size, len(self.labels)

        def evaluate(model) -> dict:
            preds = logits_of(model, eval_rows, collate, batch_size).argmax(-1).tolist()
            return classification_metrics(preds, eval_ids, k)

        majority = max(range(k), key=train_ids.count)
        self.info.update({"labels": self.labels,
                          "baseline": classification_metrics([majority] * len(eval_ids), eval_ids, k)})
        return TaskData(train_rows, collate, evaluate, self.info)

    def build_model(self, method, tokenizer):
        model = super().build_model(method, tokenizer)
        config = model.config
        config.id2label = {i: str(name) for i, name in enumerate(self.labels)}
        config.label2id = {str(name): i for i, name in enumerate(self.labels)}
        return model

    def record(self) -> dict:
        return {**super().record(), "labels": self.labels}

    def save_final(self, method, model, tokenizer, directory, task_info=None) -> None:
        super().save_final(method, model, tokenizer, directory)
        if not (directory / "config.json").exists():  # adapters: the base's config, with the label names
            model.config.save_pretrained(directory)

    def final_line(self, final, data) -> str:
        base = data.info["baseline"]
        return (f"accuracy {final['accuracy']:.4f}  macro_f1 {final['macro_f1']:.4f}  (majority class: accuracy "
                f"{base['accuracy']:.4f})")


class Regression(_Labeled):
    task_type = "regression"
    best_metric = "pearson"

    def head(self):
        return 1, "regression"

    def load_data(self, tokenizer) -> TaskData:
        from peftkit.tasks.glue import PadCollator

        d = self.recipe.data
        train, validation, (train_rows, eval_rows) = self._read(tokenizer)
        train_values = numeric_labels(train, d.label_column)
        eval_values = numeric_labels(validation, d.label_column)
        for rows, values in ((train_rows, train_values), (eval_rows, eval_values)):
            for row, value in zip(rows, values):
                row["labels"] = value
        collate = PadCollator(tokenizer.pad_token_id or 0, regression=True)
        batch_size = self.recipe.train.eval_batch_size

        def evaluate(model) -> dict:
            return regression_metrics(logits_of(model, eval_rows, collate, batch_size)[:, 0].tolist(), eval_values)

        mean = sum(train_values) / len(train_values)
        self.info["baseline"] = regression_metrics([mean] * len(eval_values), eval_values)
        return TaskData(train_rows, collate, evaluate, self.info)

    def final_line(self, final, data) -> str:
        return (f"pearson {final['pearson']:.4f}  spearman {final['spearman']:.4f}  mse {final['mse']:.4f}  "
                f"(training mean: mse {data.info['baseline']['mse']:.4f})")


class CausalLM(OwnData):
    task_type = "causal-lm"
    best_metric = "ppl"
    greater_is_better = False
    evaluate_start = True

    def load_data(self, tokenizer) -> TaskData:
        from peftkit.tasks.causal_lm import collate_windows, perplexity_of_windows

        d = self.recipe.data
        train, validation, how = read_sides(d)
        self.text_columns = list(d.text_columns or ["text"])
        require_columns(train, self.text_columns, "data.text_columns")
        require_columns(validation, self.text_columns, "data.text_columns")
        column = self.text_columns[0]
        train_windows, lengths = lm_windows(tokenizer, texts(train, column), d.max_length, train.where, True)
        eval_windows = lm_windows(tokenizer, texts(validation, column), d.max_length, validation.where)
        self.info.update({"n_train": len(train.rows), "n_eval": len(validation.rows), "train_source": train.where,
                          "validation": how, "train_windows": len(train_windows), "eval_windows": len(eval_windows),
                          "packing": d.packing})

        def evaluate(model) -> dict:
            return perplexity_of_windows(model, eval_windows)

        if d.packing:  # the same windows; each row attends only to itself inside them
            from peftkit.tasks.packing import collate_packed_windows, window_positions

            positions = window_positions(lengths, d.max_length, len(train_windows))
            return TaskData([{"input_ids": w, "position_ids": p} for w, p in zip(train_windows, positions)],
                            collate_packed_windows, evaluate, self.info)
        return TaskData([{"input_ids": w} for w in train_windows], collate_windows, evaluate, self.info)

    def record(self) -> dict:
        return {**super().record(), "text_columns": self.text_columns}

    def final_line(self, final, data) -> str:
        return f"ppl {final['ppl']:.4f}  nll {final['nll']:.4f}  ({final['windows']} windows x {final['seq_len']} tokens)"


class SFT(OwnData):
    task_type = "sft"
    best_metric = "loss"
    greater_is_better = False
    evaluate_start = True

    def columns(self) -> tuple[str, str]:
        d = self.recipe.data
        return d.prompt_column or "prompt", d.response_column or "response"

    def load_data(self, tokenizer) -> TaskData:
        d = self.recipe.data
        prompt, response = self.columns()
        train, validation, how = read_sides(d)
        encoded = []
        for table, side in ((train, "train"), (validation, "eval")):
            require_columns(table, [prompt, response], "data.prompt_column / data.response_column")
            rows, over, dropped = encode_sft(tokenizer, texts(table, prompt), texts(table, response), d.max_length)
            if not rows:
                raise UserError(f"{table.where}: no row keeps a response token within data.max_length {d.max_length}; "
                                f"raise data.max_length or shorten the prompts.")
            encoded.append(rows)
            self.info.update({f"longer_{side}": over, f"dropped_{side}": dropped})
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        collate = SFTCollator(pad_id)
        eval_rows, batch_size = encoded[1], self.recipe.train.eval_batch_size
        self.info.update({"n_train": len(encoded[0]), "n_eval": len(eval_rows), "train_source": train.where,
                          "validation": how, "chat_template": bool(getattr(tokenizer, "chat_template", None)),
                          "packing": d.packing})

        def evaluate(model) -> dict:
            return response_loss(model, eval_rows, collate, batch_size)

        if d.packing:  # training rows only: evaluation scores each row alone, so packed and unpacked runs compare
            from peftkit.tasks.packing import PackedCollator, pack_rows

            packed = pack_rows(encoded[0], d.max_length)
            self.info["packed_rows"] = len(packed)
            return TaskData(packed, PackedCollator(pad_id), evaluate, self.info)
        return TaskData(encoded[0], collate, evaluate, self.info)

    def record(self) -> dict:
        prompt, response = self.columns()
        return {**super().record(), "prompt_column": prompt, "response_column": response}

    def final_line(self, final, data) -> str:
        return f"response loss {final['loss']:.4f}  ppl {final['ppl']:.4f}  ({final['tokens']} response tokens)"


TYPES: dict[str, type[OwnData]] = {"classification": Classification, "regression": Regression, "causal-lm": CausalLM,
                                   "sft": SFT}


# ---- reading new rows the way a finished run was trained ---------------------------------------------------
class RunReading:
    """How a finished run reads rows: its text columns, label column, task type and class labels, from the run's
    peftkit.json (a `dataset` run or a GLUE run) or, for a plain checkpoint, from its config and the rows."""

    def __init__(self, info, model_config=None):
        """``info``: the run's RunInfo, or None for a checkpoint without one."""
        info = info if info is not None else {}
        self.max_length = int(info.get("max_length") or 128)
        task = info.get("task")
        if task == "dataset":
            self.task_type = info.get("task_type")
            self.text_columns = list(info.get("text_columns") or [])
            self.label_column = info.get("label_column", "label")
            self.labels = list(info.get("labels") or [])
            self.prompt_column, self.response_column = info.get("prompt_column"), info.get("response_column")
        elif task:
            from peftkit.tasks.glue import TASKS_BY_NAME

            if task not in TASKS_BY_NAME:
                raise UserError(f"the run was trained on {task!r}, which has no rows of its own to read; predict and "
                                f"eval on files work for classification, regression and SFT runs.")
            glue = TASKS_BY_NAME[task]
            self.task_type = "regression" if glue.is_regression else "classification"
            self.text_columns, self.label_column = list(glue.text_keys), "label"
            self.labels = [] if glue.is_regression else list(range(glue.num_labels))
            self.prompt_column = self.response_column = None
        else:  # a plain transformers classifier: its config names the classes
            id2label = getattr(model_config, "id2label", None) or {}
            regression = getattr(model_config, "problem_type", None) == "regression"
            self.task_type = "regression" if regression else "classification"
            self.text_columns, self.label_column = [], "label"
            self.labels = [] if regression else [id2label[i] for i in sorted(id2label)]
            self.prompt_column = self.response_column = None

    def columns_of(self, table: Table) -> list[str]:
        columns = self.text_columns or infer_text_columns(table, {self.label_column})
        require_columns(table, columns, "the text the run was trained on")
        return columns

    def encode(self, tokenizer, table: Table) -> list[dict]:
        rows, _ = encode_texts(tokenizer, [texts(table, c) for c in self.columns_of(table)], self.max_length)
        return rows

    def gold(self, table: Table) -> list:
        """The label of each row: class ids (an unknown class is an error) or numbers."""
        require_columns(table, [self.label_column], "the label column of the run")
        if self.task_type == "regression":
            return numeric_labels(table, self.label_column)
        return label_ids(table, class_labels(table, self.label_column), self.labels)
