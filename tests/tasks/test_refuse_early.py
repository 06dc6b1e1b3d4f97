"""A model or method a run cannot use is refused before any data is read, whatever the task.

Reading and tokenizing a language model's text takes a while; a refusal that only comes after it wastes that time.
Each test replaces the tasks' data steps with a spy that fails the run if it is called.
"""

from __future__ import annotations

import pytest
from helpers.quant import write_wikitext
from helpers.reliability import invoke, write_recipe

from peftkit.tasks.causal_lm import CausalLMText, LMText
from peftkit.tasks.glue import GlueFinetuning


@pytest.fixture
def data_steps_forbidden(monkeypatch):
    """Every data step of the LM and GLUE tasks raises; a test that reaches one fails with its name."""
    called = []

    def spy(name):
        def forbidden(*args, **kwargs):
            called.append(name)
            raise AssertionError(f"{name} was called before the refusal")
        return forbidden

    for cls in (CausalLMText, GlueFinetuning):
        for step in ("read_data", "load_tokenizer", "load_data"):
            monkeypatch.setattr(cls, step, spy(f"{cls.__name__}.{step}"))
    monkeypatch.setattr(LMText, "read", classmethod(lambda cls, root: spy("LMText.read")()))
    return called


def tiny_gpt2(directory):
    """A GPT-2 checkpoint (a family MEFT does not support) with a tokenizer."""
    from helpers.tiny import tiny_bert_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=128, n_positions=64)).save_pretrained(directory)
    tiny_bert_tokenizer(directory)
    return directory


def lm_recipe(tmp_path, model, method):
    return {"model": {"name": str(model), "task_head": "causal_lm"},
            "data": {"task": "wikitext2", "max_length": 16, "root": str(write_wikitext(tmp_path / "wt", words=300))},
            "method": {"name": method}, "train": {"max_steps": 1, "batch_size": 2, "threads": 1},
            "output": {"dir": str(tmp_path / "run")}}


def assert_refused(result, *needles):
    assert result.exit_code == 2, f"exit {result.exit_code}:\n{result.output}\n{result.exception!r}"
    for needle in needles:
        assert needle in result.output, result.output


def test_a_causal_lm_of_a_family_the_method_does_not_support_is_refused_before_its_text_is_read(
        tmp_path, data_steps_forbidden):
    path = write_recipe(tmp_path / "r.yaml", lm_recipe(tmp_path, tiny_gpt2(tmp_path / "gpt2"), "meft1"))
    assert_refused(invoke("finetune", path), "method meft1 does not support gpt2")
    assert data_steps_forbidden == [] and not (tmp_path / "run").exists()


def test_a_classifier_of_a_family_the_method_does_not_support_is_refused_before_its_data_is_read(
        tmp_path, data_steps_forbidden):
    recipe = {"model": {"name": str(tiny_gpt2(tmp_path / "gpt2"))}, "data": {"task": "sst2", "max_length": 16},
              "method": {"name": "meft1"}, "train": {"max_steps": 1, "batch_size": 2, "threads": 1},
              "output": {"dir": str(tmp_path / "run")}}
    assert_refused(invoke("finetune", write_recipe(tmp_path / "r.yaml", recipe)), "method meft1 does not support gpt2")
    assert data_steps_forbidden == [] and not (tmp_path / "run").exists()


def test_apiq_on_a_base_that_is_no_quantize_output_is_refused_before_the_text_is_read(tmp_path, data_steps_forbidden):
    path = write_recipe(tmp_path / "r.yaml", lm_recipe(tmp_path, tiny_gpt2(tmp_path / "gpt2"), "apiq"))
    assert_refused(invoke("finetune", path), "method apiq fine-tunes a `peftkit quantize` output", "peftkit quantize` first")
    assert data_steps_forbidden == [] and not (tmp_path / "run").exists()
