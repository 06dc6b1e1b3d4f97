"""An unmerged export loads with plain peft from any working directory, and with peftkit after it was moved.

adapter_config.json names the copied base by its absolute path (peft resolves a relative name against the working
directory); export.json keeps the relative "base", which peftkit resolves against the export wherever it is.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from peftkit.commands.export import export
from peftkit.commands.train import finetune
from peftkit.artifacts.load import load_run

SENTENCES = ["good movie", "the plot was awful and boring"]


@pytest.fixture
def lora_run(tiny_run_setup):
    return finetune(tiny_run_setup("lora", out="run-lora", max_steps=2, save_every=2, eval_every=2, lr=0.03), [])


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


def test_a_peft_export_loads_with_auto_peft_model_from_another_directory(lora_run, tmp_path, monkeypatch):
    from peft import AutoPeftModelForSequenceClassification

    import peftkit

    monkeypatch.chdir(tmp_path)
    out = export(str(lora_run), "export", False)  # a relative --out, as users type it
    assert json.loads((tmp_path / "export" / "export.json").read_text())["export"]["base"] == "base"
    assert json.loads((tmp_path / "export" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (tmp_path / "export" / "base").resolve())
    reference, tokenizer, _ = load_run(lora_run)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    expected = _logits(reference, batch)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    theirs = AutoPeftModelForSequenceClassification.from_pretrained(str((tmp_path / out).resolve()))
    assert (_logits(theirs, batch) - expected).abs().max().item() <= 1e-4

    moved = shutil.move(str(tmp_path / "export"), str(tmp_path / "moved"))  # peftkit finds base/ beside it
    assert (_logits(peftkit.load(moved)[0], batch) - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_a_causal_lm_export_loads_with_auto_peft_model_from_another_directory(tmp_path, monkeypatch):
    from helpers.quant import write_model_dir, write_wikitext
    from peft import AutoPeftModelForCausalLM

    model, data = write_model_dir(tmp_path / "model"), write_wikitext(tmp_path / "wt", words=600)
    run = finetune({"model": {"name": str(model), "task_head": "causal_lm"},
                    "data": {"task": "wikitext2", "root": str(data), "max_length": 32, "eval_limit": 2},
                    "method": {"name": "lora"}, "output": {"dir": str(tmp_path / "run")},
                    "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "seed": 3, "eval_every": 2,
                              "warmup_ratio": 0.0, "threads": 1}}, [])
    out = export(str(run), str(tmp_path / "export"), False)
    ids = torch.randint(5, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    reference, _, _ = load_run(run)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    monkeypatch.chdir(tmp_path / "wt")
    theirs = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - expected).abs().max().item() <= 1e-4
    # what `peftkit generate` and `eval --task wikitext2` load, after the export was moved
    moved, _, _ = load_run(shutil.move(str(out), str(tmp_path / "moved")), plain_head="causal_lm")
    with torch.no_grad():
        assert (moved(input_ids=ids).logits - expected).abs().max().item() <= 1e-4
