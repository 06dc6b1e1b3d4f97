"""The `dataset` task: one's own CSV / JSONL / Parquet rows as classification, regression, pairs and SFT, checked
against plain transformers / peft loaders and straight-line reimplementations; bad files as user errors."""

import json

import pytest
from helpers.own_data import (
    pair_rows,
    qa_rows,
    save_tiny_decoder,
    score_rows,
    sentiment_rows,
    write_rows,
)
from helpers.tiny import save_tiny_classifier

from peftkit.config.loader import load_recipe
from peftkit.errors import UserError


def recipe(model, data, out, method="lora", head="seq_cls", **train):
    t = {"max_steps": 6, "batch_size": 8, "lr": 1e-2, "seed": 3, "log_every": 1, "threads": 1, "warmup_ratio": 0.0}
    t.update(train)
    return {"model": {"name": str(model), "task_head": head}, "data": {"max_length": 16, **data},
            "method": {"name": method}, "train": t, "output": {"dir": str(out)}}


def run(r):
    from peftkit.train.pipeline import run_training

    run_dir = run_training(load_recipe(r, kind="finetune"))
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture
def bert(tmp_path):
    return save_tiny_classifier(tmp_path / "bert")


@pytest.mark.slow
def test_csv_with_other_column_names_and_string_labels_round_trips_the_label_names(tmp_path, bert):
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    write_rows(tmp_path / "train.csv", sentiment_rows(64))
    val = sentiment_rows(20, seed=1)
    write_rows(tmp_path / "val.csv", val)
    data = {"train_file": str(tmp_path / "train.csv"), "validation_file": str(tmp_path / "val.csv"),
            "text_columns": ["review"], "label_column": "sentiment"}
    run_dir, m = run(recipe(bert, data, tmp_path / "run", method="full", max_steps=60, lr=5e-3, eval_every=20))
    assert m["task"] == "dataset" and m["task_type"] == "classification" and m["labels"] == ["negative", "positive"]
    config = AutoConfig.from_pretrained(run_dir / "final")
    assert config.id2label == {0: "negative", 1: "positive"} and config.label2id == {"negative": 0, "positive": 1}
    # the figures again, with plain transformers on final/ and scikit-learn
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "final").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    import torch

    with torch.no_grad():
        logits = model(**tok([r["review"] for r in val], padding=True, truncation=True, max_length=16,
                             return_tensors="pt")).logits
    preds = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    refs = [r["sentiment"] for r in val]
    assert m["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    assert m["macro_f1"] == pytest.approx(f1_score(refs, preds, average="macro"))
    assert m["accuracy"] > 0.8, m  # a polar word decides the label: the model learns it


def test_adapter_runs_keep_the_label_names_in_a_config_beside_the_adapter(tmp_path, bert):
    from transformers import AutoConfig

    write_rows(tmp_path / "train.csv", sentiment_rows(40))
    data = {"train_file": str(tmp_path / "train.csv"), "label_column": "sentiment"}
    run_dir, m = run(recipe(bert, data, tmp_path / "run"))
    assert m["text_columns"] == ["review"]  # the one text column besides the label
    assert (run_dir / "final" / "adapter_config.json").is_file()
    assert AutoConfig.from_pretrained(run_dir / "final").id2label == {0: "negative", 1: "positive"}
    info = json.loads((run_dir / "final" / "peftkit.json").read_text())
    assert info["labels"] == ["negative", "positive"] and info["label_column"] == "sentiment"


def test_validation_fraction_is_the_same_held_out_rows_every_time(tmp_path):
    from peftkit.tasks.tabular import SPLIT_SEED, split_off

    rows = [{"i": i} for i in range(50)]
    a, b = split_off(rows, 0.2), split_off(rows, 0.2)
    assert a == b and len(a[1]) == 10 and len(a[0]) == 40 and SPLIT_SEED == 0
    assert {r["i"] for r in a[0]}.isdisjoint({r["i"] for r in a[1]})
    assert [r["i"] for r in a[1]] != list(range(40, 50))  # drawn, not the tail


@pytest.mark.slow
def test_jsonl_regression_against_scipy_and_a_plain_loader(tmp_path, bert):
    import numpy as np
    import torch
    from scipy.stats import pearsonr, spearmanr
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    write_rows(tmp_path / "train.jsonl", score_rows(64))
    val = score_rows(16, seed=2)
    write_rows(tmp_path / "val.jsonl", val)
    data = {"train_file": str(tmp_path / "train.jsonl"), "validation_file": str(tmp_path / "val.jsonl"),
            "label_column": "score", "task_type": "regression"}
    run_dir, m = run(recipe(bert, data, tmp_path / "run", method="full", max_steps=12))
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "final").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    with torch.no_grad():
        preds = model(**tok([r["text"] for r in val], padding=True, return_tensors="pt")).logits[:, 0].numpy()
    refs = np.array([r["score"] for r in val])
    assert m["pearson"] == pytest.approx(pearsonr(preds, refs)[0], abs=1e-5)
    assert m["spearman"] == pytest.approx(spearmanr(preds, refs)[0], abs=1e-5)
    assert m["mse"] == pytest.approx(float(np.mean((preds - refs) ** 2)), rel=1e-5)
    assert model.config.problem_type == "regression" and model.config.num_labels == 1


def test_parquet_pairs_are_encoded_as_sentence_pairs(tmp_path, bert):
    from peftkit.tasks.dataset import OwnData

    write_rows(tmp_path / "train.parquet", pair_rows(40))
    data = {"train_file": str(tmp_path / "train.parquet"), "text_columns": ["first", "second"],
            "label_column": "same"}
    r = load_recipe(recipe(bert, data, tmp_path / "run"), kind="finetune")
    task = OwnData(r)
    tok = task.load_tokenizer()
    loaded = task.load_data(tok)
    assert task.labels == [0, 1] and type(task).__name__ == "Classification"
    rows = pair_rows(40)
    first = next(x for x in loaded.train)  # the first kept training row is some pair of the file
    expected = [tok(x["first"], x["second"], truncation=True, max_length=16)["input_ids"] for x in rows]
    assert first["input_ids"] in expected and 1 in first["token_type_ids"]
    run_dir, m = run(recipe(bert, data, tmp_path / "run"))
    assert m["labels"] == [0, 1] and 0 <= m["accuracy"] <= 1


@pytest.mark.slow
def test_sft_with_a_chat_template_takes_the_loss_on_the_response_only(tmp_path):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.tasks.dataset import SFTCollator, encode_sft

    decoder = save_tiny_decoder(tmp_path / "llama")
    tok = AutoTokenizer.from_pretrained(decoder)
    rows, over, dropped = encode_sft(tok, ["is good good or bad"], ["good"], 64)
    whole = tok.apply_chat_template([{"role": "user", "content": "is good good or bad"},
                                     {"role": "assistant", "content": "good"}], tokenize=False)
    assert rows[0]["input_ids"] == tok(whole, add_special_tokens=False)["input_ids"]
    kept = [i for i, label in zip(rows[0]["input_ids"], rows[0]["labels"]) if label != -100]
    assert tok.decode(kept) == "good <|end|>" and (over, dropped) == (0, 0)
    # the response-only loss by hand: cross-entropy on the two answer tokens, nothing else
    model = AutoModelForCausalLM.from_pretrained(decoder).eval()
    batch = SFTCollator(tok.pad_token_id)(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[0]
    n = len(kept)
    by_hand = F.cross_entropy(logits[-n - 1 : -1], torch.tensor(kept))
    with torch.no_grad():
        assert model(**batch).loss == pytest.approx(by_hand.item(), rel=1e-5)

    write_rows(tmp_path / "qa.jsonl", qa_rows(64))
    write_rows(tmp_path / "qa-val.jsonl", qa_rows(16, seed=5))
    data = {"train_file": str(tmp_path / "qa.jsonl"), "validation_file": str(tmp_path / "qa-val.jsonl"),
            "prompt_column": "question", "response_column": "answer", "max_length": 32}
    run_dir, m = run(recipe(decoder, data, tmp_path / "sft", method="full", head="causal_lm", max_steps=24, lr=3e-3))
    assert m["task_type"] == "sft" and m["chat_template"] is True and m["tokens"] == 16 * 2
    assert m["loss"] < 0.6 * m["loss_start"], m
    info = json.loads((run_dir / "final" / "peftkit.json").read_text())
    assert (info["prompt_column"], info["response_column"]) == ("question", "answer")


def test_rows_longer_than_max_length_are_counted_in_the_log(tmp_path, bert, capsys):
    rows = sentiment_rows(30)
    for r in rows[:7]:
        r["review"] = " ".join(["the movie"] * 20)
    write_rows(tmp_path / "train.csv", rows)
    data = {"train_file": str(tmp_path / "train.csv"), "label_column": "sentiment", "validation_fraction": 0.2}
    run_dir, m = run(recipe(bert, data, tmp_path / "run", max_steps=2))
    log = (run_dir / "train.log").read_text()
    held = m["longer_eval"]
    assert m["longer_train"] + held == 7 and f"{m['longer_train']} training, {held} validation" in log


# ---- bad data and bad recipes -------------------------------------------------------------------------------
def _load(tmp_path, bert, train_text, suffix=".csv", val_text=None, **data):
    from peftkit.tasks.dataset import OwnData

    (tmp_path / f"train{suffix}").write_text(train_text)
    d = {"train_file": str(tmp_path / f"train{suffix}"), **data}
    if val_text is not None:
        (tmp_path / f"val{suffix}").write_text(val_text)
        d["validation_file"] = str(tmp_path / f"val{suffix}")
    task = OwnData(load_recipe(recipe(bert, d, tmp_path / "run"), kind="finetune"))
    return task.load_data(task.load_tokenizer())


@pytest.mark.parametrize("train,val,data,needles", [
    ("text,label\na,x\nb,y\n", None, {"label_column": "sentiment"}, ["train.csv", "'sentiment'", "text, label"]),
    ("", "text,label\na,b\n", {}, ["train.csv", "empty"]),
    ("text,label\n", "text,label\na,b\n", {}, ["train.csv", "no rows"]),
    ("text,label\ngood,pos\nbad,neg\n", "text,label\ngood,pos\nfun,meh\n", {}, ["val.csv", "row 2", "'meh'"]),
    ("text,label\ngood,pos\nbad,pos\n", None, {}, ["at least two classes"]),
    ('{"text": "good", "label": "pos"}\n{"text": "bad", "label": 1}\n', None, {},
     ["train.jsonl", "row 2", "'label'", "mixes types"]),
    ('{"text": "good", "label": 1}\n{"text": 7, "label": 0}\n', None, {}, ["train.jsonl", "row 2", "'text'", "expected text"]),
    ('{"text": "good", "label": 1}\n{"label": 0}\n', None, {}, ["train.jsonl", "row 2", "'text'", "empty"]),
    ('{"text": "good", "score": 1}\n{"text": "b", "score": "high"}\n', None,
     {"label_column": "score", "task_type": "regression"}, ["row 2", "'score'", "not a finite number"]),
])
def test_bad_files_name_file_row_and_column(tmp_path, bert, train, val, data, needles):
    suffix = ".jsonl" if train.startswith("{") else ".csv"
    with pytest.raises(UserError) as e:
        _load(tmp_path, bert, train, suffix, train if val is None else val, **data)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("data,head,method,needle", [
    ({"task": "sst2", "train_file": "x.csv"}, "seq_cls", "lora", "data.train_file: data.task 'sst2'"),
    ({"task": "sst2", "label_column": "y"}, "seq_cls", "lora", "data.label_column: an option for your own data"),
    ({"train_file": "missing.csv"}, "seq_cls", "lora", "data.train_file: missing.csv does not exist"),
    ({"train_file": "rows.txt"}, "seq_cls", "lora", "use one of .csv"),
    ({"train_file": "{f}", "prompt_column": "q"}, "seq_cls", "lora", "model.task_head: data.task_type sft"),
    ({"train_file": "{f}", "task_type": "causal-lm"}, "causal_lm", "hiwi", "method.name: 'hiwi'"),
    ({"train_file": "{f}", "dataset_name": "imdb"}, "seq_cls", "lora", "not both"),
    ({"train_file": "{f}", "eval_split": "test"}, "seq_cls", "lora", "data.validation_file instead"),
    ({"train_file": "{f}", "text_columns": ["a", "b", "c"]}, "seq_cls", "lora", "data.text_columns"),
    ({"train_file": "{f}", "validation_fraction": 0.9}, "seq_cls", "lora", "data.validation_fraction"),
])
def test_recipe_cross_checks(tmp_path, data, head, method, needle):
    write_rows(tmp_path / "rows.csv", sentiment_rows(4))
    data = {k: (str(tmp_path / "rows.csv") if v == "{f}" else v) for k, v in data.items()}
    r = {"model": {"name": "minilm-l6", "task_head": head}, "data": data, "method": {"name": method}}
    with pytest.raises(UserError) as e:
        load_recipe(r, kind="finetune")
    assert needle in str(e.value), str(e.value)


def test_a_recipe_with_a_train_file_picks_the_dataset_task_and_glue_recipes_are_unchanged(tmp_path):
    write_rows(tmp_path / "rows.csv", sentiment_rows(4))
    r = load_recipe({"data": {"train_file": str(tmp_path / "rows.csv")}}, kind="finetune")
    assert r.data.task == "dataset"
    assert load_recipe("lora-minilm-sst2", kind="finetune").data.task == "sst2"


def test_an_uncached_hub_dataset_offline_is_a_user_error(tmp_path, bert, monkeypatch):
    from peftkit.tasks.dataset import OwnData

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = OwnData(load_recipe(recipe(bert, {"dataset_name": "no-such-owner/no-such-dataset"}, tmp_path / "r"),
                               kind="finetune"))
    with pytest.raises(UserError, match="no-such-owner/no-such-dataset"):
        task.load_data(task.load_tokenizer())
