"""RunInfo: what final/peftkit.json holds, read and written through one typed object with the keys on disk unchanged."""

import json

import pytest

from peftkit.config.run_info import INFO_FILE, RunInfo, read_run_info
from peftkit.errors import UserError

# A dataset run's record as peftkit has written it: the common keys and the task's own ones, in this order.
WRITTEN = {"method": "lora", "options": {"r": 8, "alpha": 16}, "model": {"name": "minilm-l6", "task_head": "seq_cls"},
           "task": "dataset", "task_type": "classification", "label_column": "sentiment", "labels": ["neg", "pos"],
           "num_labels": 2, "problem_type": "single_label_classification", "max_length": 64}


def test_an_earlier_run_record_loads_and_writes_back_byte_for_byte(tmp_path):
    (tmp_path / INFO_FILE).write_text(json.dumps(WRITTEN, indent=2))
    info = read_run_info(tmp_path)
    assert (info.method, info.task, info.num_labels, info.max_length) == ("lora", "dataset", 2, 64)
    assert info.get("labels") == ["neg", "pos"] and info.get("prompt_column") is None  # task keys, as written
    (tmp_path / "again").mkdir()
    info.write(tmp_path / "again")
    assert (tmp_path / "again" / INFO_FILE).read_text() == json.dumps(WRITTEN, indent=2)


def test_a_record_without_task_keys_gains_none_on_disk(tmp_path):
    """A language-model run records num_labels null; a key never given is not written as null."""
    RunInfo(method="full", options={}, model={"name": "m", "task_head": "causal_lm"}, task="wikitext2",
            num_labels=None, max_length=32).write(tmp_path)
    assert json.loads((tmp_path / INFO_FILE).read_text()) == {
        "method": "full", "options": {}, "model": {"name": "m", "task_head": "causal_lm"}, "task": "wikitext2",
        "num_labels": None, "max_length": 32}


@pytest.mark.parametrize("content, needle", [
    ("{not json", "cannot be read as JSON"),
    ("[1, 2]", "is not peftkit run metadata"),
    (json.dumps({**WRITTEN, "method": "lorra"}), "names the method 'lorra'"),
    (json.dumps({**WRITTEN, "model": {"name": "m", "task_head": "regression"}}), "its model section is not valid"),
    (json.dumps({**WRITTEN, "num_labels": "two"}), "num_labels"),
])
def test_a_bad_record_is_one_clear_error_naming_the_file(tmp_path, content, needle):
    (tmp_path / INFO_FILE).write_text(content)
    with pytest.raises(UserError, match=needle) as caught:
        read_run_info(tmp_path / INFO_FILE)
    assert str(tmp_path / INFO_FILE) in str(caught.value)
