import json

import pytest
from helpers.tiny import write_glue_task

from peftkit.errors import UserError
from peftkit.tasks.glue import TASKS_BY_NAME as TASKS
from peftkit.tasks.glue import PadCollator, get_task, load_rows, tokenize_rows


def test_registry_knows_all_nine_tasks():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert get_task("stsb").is_regression and get_task("mnli").num_labels == 3
    assert get_task("mnli").validation_splits == ("validation_matched", "validation_mismatched")
    assert get_task("cola").main_metric == "matthews_correlation"
    with pytest.raises(UserError, match="did you mean"):
        get_task("sst")


def test_jsonl_tsv_and_parquet_roots_give_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_glue_task(tmp_path / "a", "mrpc", 10, 4)
    rows = load_rows("mrpc", "train", str(tmp_path / "a"))
    raw = [json.loads(line) for line in (tmp_path / "a" / "mrpc" / "train.jsonl").read_text().splitlines()]
    (tmp_path / "b" / "mrpc").mkdir(parents=True)
    with open(tmp_path / "b" / "mrpc" / "train.tsv", "w") as f:
        f.write("sentence1\tsentence2\tlabel\tidx\n")
        for r in raw:
            f.write(f"{r['sentence1']}\t{r['sentence2']}\t{r['label']}\t{r['idx']}\n")
    (tmp_path / "c" / "mrpc").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "c" / "mrpc" / "train.parquet")
    assert load_rows("mrpc", "train", str(tmp_path / "b")) == rows
    assert load_rows("mrpc", "train", str(tmp_path / "c")) == rows
    assert rows[0].keys() == {"sentence1", "sentence2", "label"}


def test_env_data_dir_and_limit(tmp_path, monkeypatch):
    write_glue_task(tmp_path, "sst2", 20, 4)
    monkeypatch.setenv("PEFTKIT_DATA_DIR", str(tmp_path))
    assert len(load_rows("sst2", "train", None, limit=5)) == 5


def test_missing_split_names_what_to_set(tmp_path):
    with pytest.raises(UserError) as e:
        load_rows("rte", "train", str(tmp_path))
    assert "data.root" in str(e.value) and "PEFTKIT_DATA_DIR" in str(e.value)


def test_no_root_offline_fails_fast(monkeypatch):
    monkeypatch.delenv("PEFTKIT_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="PEFTKIT_DATA_DIR"):
        load_rows("sst2", "train", None)


@pytest.mark.parametrize("content,needle", [
    ('{"text": "x", "label": 1}\n', "column"),
    ('{"sentence": "x", "label": 2}\n', "outside 0..1"),
    ('{"sentence": "x", "label": "pos"}\n', "not a number"),
    ("", "no rows"),
    ('{"sentence": "x", "label": 1}\n{oops\n', "line 2"),
])
def test_bad_files_are_user_errors(tmp_path, content, needle):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.jsonl").write_text(content)
    with pytest.raises(UserError) as e:
        load_rows("sst2", "train", str(tmp_path))
    assert needle in str(e.value)


def test_tokenize_and_pad(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    write_glue_task(tmp_path, "mrpc", 6, 2)
    task = get_task("mrpc")
    data = tokenize_rows(task, load_rows("mrpc", "train", str(tmp_path)), tok, max_length=8)
    assert all(len(r["input_ids"]) <= 8 for r in data)
    batch = PadCollator(tok.pad_token_id, regression=False)(data[:3])
    width = max(len(r["input_ids"]) for r in data[:3])
    assert batch["input_ids"].shape == (3, width)
    assert batch["attention_mask"].sum().item() == sum(len(r["input_ids"]) for r in data[:3])
    assert batch["labels"].dtype.is_floating_point is False
    reg = PadCollator(0, regression=True)([{"input_ids": [5], "labels": 2.5}])
    assert reg["labels"].dtype.is_floating_point
