"""tasks/causal_lm.py: WikiText-2 as training windows, the collator and the recipe checks of an LM task."""

from types import SimpleNamespace

import pytest
import torch
from helpers.quant import write_wikitext  # noqa: E402

from peftkit.errors import UserError  # noqa: E402
from peftkit.tasks.causal_lm import CausalLMText, LMText, collate_windows, text_windows  # noqa: E402
from peftkit.tasks.glue import GlueFinetuning  # noqa: E402


def _tokenizer(tmp_path):
    from helpers.tiny import tiny_bert_tokenizer

    return tiny_bert_tokenizer(tmp_path / "tok")


def test_windows_are_non_overlapping_and_cover_the_text_in_order(tmp_path):
    tok = _tokenizer(tmp_path)
    text = (write_wikitext(tmp_path / "wt", words=250) / "wiki.valid.tokens").read_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    windows = text_windows(tok, text, 16)
    n = len(ids) // 16
    assert windows.shape == (n, 16) and n >= 15
    # concatenated they are exactly the stream up to the last full window: no overlap, no gap, no special tokens
    assert windows.reshape(-1).tolist() == ids[:n * 16]
    assert tok.cls_token_id not in windows and tok.sep_token_id not in windows
    assert torch.equal(text_windows(tok, text, 16, limit=3), windows[:3])


def test_collate_stacks_windows_with_labels_equal_to_inputs():
    windows = torch.arange(24).reshape(3, 8)
    batch = collate_windows([{"input_ids": w} for w in windows][1:])
    assert torch.equal(batch["input_ids"], windows[1:]) and torch.equal(batch["labels"], windows[1:])
    assert "attention_mask" not in batch
    batch["labels"][0, 0] = -100  # the loss may mask labels in place: inputs must not change with them
    assert batch["input_ids"][0, 0] == 8


def test_a_text_shorter_than_one_window_names_max_length(tmp_path):
    with pytest.raises(UserError, match="data.max_length 64"):
        text_windows(_tokenizer(tmp_path), "the cat sat on the mat", 64, where="wiki.test.raw")


def test_missing_files_name_the_path_and_the_setting(tmp_path):
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / "wiki.valid.tokens").write_text("the cat\n")
    with pytest.raises(UserError, match=r"wiki\.test\.raw.*PEFTKIT_WIKITEXT"):
        LMText.read(str(tmp_path / "wt"))
    texts = LMText.read(str(write_wikitext(tmp_path / "ok", words=20)))
    assert texts.train_text.split() and texts.eval_text.split()


def _recipe(**changes):
    base = dict(source="r.yaml", method_name="lora", model=SimpleNamespace(task_head="causal_lm"),
                data=SimpleNamespace(task="wikitext2", train_split="train", eval_split=None))
    base.update(changes)
    return SimpleNamespace(**base)


def test_task_problems_list_every_mismatch_at_once():
    task_problems = CausalLMText.recipe_problems
    assert task_problems(_recipe()) == [] and task_problems(_recipe(method_name="apiq")) == []
    problems = task_problems(_recipe(method_name="hiwi", model=SimpleNamespace(task_head="seq_cls"),
                                     data=SimpleNamespace(task="wikitext2", train_split="validation", eval_split=None)))
    assert len(problems) == 3
    assert problems[0].startswith("model.task_head:") and "causal_lm" in problems[0]
    assert problems[1].startswith("method.name: 'hiwi' is only wired for seq_cls heads")
    assert problems[2].startswith("data.train_split")
    glue = SimpleNamespace(task="sst2", train_split="train", eval_split=None)
    assert GlueFinetuning.recipe_problems(_recipe(method_name="meft1", model=SimpleNamespace(task_head="seq_cls"),
                                                  data=glue)) == []
    assert "not the GLUE task 'sst2'" in GlueFinetuning.recipe_problems(_recipe(data=glue))[0]


def test_the_loader_reports_them_with_other_problems():
    from peftkit.config.loader import load_recipe

    with pytest.raises(UserError, match=r"2 problems.*train\.lr.*model\.task_head"):
        load_recipe({"data": {"task": "wikitext2"}, "train": {"lr": -1}})
    recipe = load_recipe({"model": {"task_head": "causal_lm"}, "data": {"task": "wikitext2"}, "method": {"name": "full"}})
    assert recipe.data.task == "wikitext2"
