"""`peftkit predict`, `peftkit generate` and `peftkit eval --task FILE` on runs of one's own data and GLUE runs,
checked against plain transformers / peft loaders."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.own_data import (
    qa_rows,
    save_tiny_decoder,
    score_rows,
    sentiment_rows,
    write_rows,
)
from helpers.tiny import save_tiny_classifier

from peftkit.config.loader import load_recipe
from peftkit.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def train(model, data, out, method="lora", head="seq_cls", **t):
    from peftkit.train.pipeline import run_training

    options = {"max_steps": 8, "batch_size": 8, "lr": 1e-2, "seed": 3, "threads": 1, "warmup_ratio": 0.0}
    options.update(t)
    r = {"model": {"name": str(model), "task_head": head}, "data": {"max_length": 32, **data},
         "method": {"name": method}, "train": options, "output": {"dir": str(out)}}
    return run_training(load_recipe(r, kind="finetune"))


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls")
    bert = save_tiny_classifier(tmp / "bert")
    write_rows(tmp / "train.csv", sentiment_rows(48))
    write_rows(tmp / "val.csv", sentiment_rows(12, seed=4))
    run = train(bert, {"train_file": str(tmp / "train.csv"), "validation_file": str(tmp / "val.csv"),
                       "label_column": "sentiment"}, tmp / "run")
    return {"run": run, "bert": bert, "val": tmp / "val.csv", "tmp": tmp}


def test_predict_matches_a_plain_peft_load_and_names_the_labels(classifier_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit.commands.predict import predict

    run = classifier_run["run"]
    out = tmp_path / "pred.jsonl"
    records = predict(str(run), str(classifier_run["val"]), str(out))
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    base = AutoModelForSequenceClassification.from_pretrained(classifier_run["bert"], num_labels=2)
    model = PeftModel.from_pretrained(base, run / "final").eval()
    tok = AutoTokenizer.from_pretrained(run / "final")
    rows = sentiment_rows(12, seed=4)
    with torch.no_grad():
        probs = model(**tok([r["review"] for r in rows], padding=True, return_tensors="pt")).logits.softmax(-1)
    for record, p in zip(records, probs.tolist()):
        assert set(record["probabilities"]) == {"negative", "positive"}
        assert record["probabilities"]["negative"] == pytest.approx(p[0], abs=1e-5)
        assert record["label"] == ("positive" if p[1] > p[0] else "negative")


def test_eval_on_a_file_reproduces_the_runs_own_figures(classifier_run, tmp_path):
    from peftkit.commands.evaluate import evaluate

    run = classifier_run["run"]
    payload = evaluate(str(classifier_run["val"]), [str(run)], json_path=str(tmp_path / "r.json"))
    metrics = json.loads((run / "metrics.json").read_text())
    row = payload["rows"][0]
    assert row["accuracy"] == round(metrics["accuracy"], 4) and row["macro_f1"] == round(metrics["macro_f1"], 4)
    assert row["n"] == 12 and json.loads((tmp_path / "r.json").read_text())["rows"] == payload["rows"]
    assert list((run / "eval").glob("results-*.json"))


def test_eval_refuses_a_label_the_run_never_saw(classifier_run, tmp_path):
    from peftkit.commands.evaluate import evaluate

    rows = sentiment_rows(4)
    rows[2]["sentiment"] = "mixed"
    write_rows(tmp_path / "odd.csv", rows)
    with pytest.raises(UserError, match=r"odd.csv, row 3: label 'mixed'"):
        evaluate(str(tmp_path / "odd.csv"), [str(classifier_run["run"])])


@pytest.mark.slow
def test_regression_predict_gives_the_plain_models_value(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit.commands.evaluate import evaluate
    from peftkit.commands.predict import predict

    bert = save_tiny_classifier(tmp_path / "bert")
    write_rows(tmp_path / "train.jsonl", score_rows(40))
    run = train(bert, {"train_file": str(tmp_path / "train.jsonl"), "label_column": "score",
                       "task_type": "regression"}, tmp_path / "run", method="full")
    records = predict(str(run), str(tmp_path / "train.jsonl"))
    model = AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    tok = AutoTokenizer.from_pretrained(run / "final")
    with torch.no_grad():
        values = model(**tok([r["text"] for r in score_rows(40)], padding=True, return_tensors="pt")).logits[:, 0]
    assert [r["value"] for r in records] == pytest.approx(values.tolist(), abs=1e-5)
    assert set(evaluate(str(tmp_path / "train.jsonl"), [str(run)])["rows"][0]) >= {"pearson", "spearman", "mse"}


@pytest.mark.slow
def test_predict_on_a_glue_run(tiny_run_setup, tmp_path):
    from peftkit.commands.predict import predict
    from peftkit.train.pipeline import run_training

    run = run_training(load_recipe(tiny_run_setup("bitfit", "sst2"), kind="finetune"))
    write_rows(tmp_path / "new.jsonl", [{"sentence": "the movie was great"}, {"sentence": "awful"}])
    records = predict(str(run), str(tmp_path / "new.jsonl"))
    assert len(records) == 2 and all(r["label"] in (0, 1) for r in records)
    assert all(sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-4) for r in records)


@pytest.mark.slow
def test_sft_run_generates_what_plain_transformers_generates_and_eval_gives_its_loss(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.commands.evaluate import evaluate
    from peftkit.commands.predict import generate

    decoder = save_tiny_decoder(tmp_path / "llama")
    write_rows(tmp_path / "qa.jsonl", qa_rows(48))
    write_rows(tmp_path / "val.jsonl", qa_rows(8, seed=9))
    run = train(decoder, {"train_file": str(tmp_path / "qa.jsonl"), "validation_file": str(tmp_path / "val.jsonl"),
                          "prompt_column": "question", "response_column": "answer"}, tmp_path / "sft", method="full",
                head="causal_lm", max_steps=24, lr=3e-3)
    records = generate(str(run), input_file=str(tmp_path / "val.jsonl"), max_new_tokens=3,
                       output=str(tmp_path / "gen.jsonl"))
    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    tok = AutoTokenizer.from_pretrained(run / "final")
    for record, row in zip(records, qa_rows(8, seed=9)):
        text = tok.apply_chat_template([{"role": "user", "content": row["question"]}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        assert record["prompt"] == row["question"]
        assert record["generation"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    sampled = generate(str(run), prompts=["is good good or bad"], temperature=1.0, top_p=0.9, seed=1)
    assert sampled == generate(str(run), prompts=["is good good or bad"], temperature=1.0, top_p=0.9, seed=1)
    metrics = json.loads((run / "metrics.json").read_text())
    row = evaluate(str(tmp_path / "val.jsonl"), [str(run)])["rows"][0]
    assert row["loss"] == pytest.approx(metrics["loss"], abs=1e-4)


@pytest.mark.subprocess
def test_cli_predict_writes_json_lines_and_never_replaces_a_foreign_file(classifier_run, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "peftkit", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=120)

    run, val = str(classifier_run["run"]), str(classifier_run["val"])
    done = cli("predict", run, "--input", val, "--output", str(tmp_path / "p.jsonl"))
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 12
    (tmp_path / "notes.txt").write_text("mine\n")
    refused = cli("predict", run, "--input", val, "--output", str(tmp_path / "notes.txt"))
    assert refused.returncode == 2 and "not a JSON-lines result file" in refused.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine\n"
    both = cli("generate", run, "--prompt", "x", "--input", val)
    assert both.returncode == 2 and "one of the two" in both.stderr
