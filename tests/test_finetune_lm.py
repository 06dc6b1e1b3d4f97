"""`peftkit finetune` with data.task wikitext2: causal-LM fine-tuning of a quantized (apiq) or plain (lora, full)
tiny LLaMA, perplexity before/after, only LoRA training on a quantized base, and `peftkit eval` on the run."""

import json
from pathlib import Path

import pytest
import torch
from helpers.quant import write_quantized_setup  # noqa: E402

from peftkit.commands.train import finetune  # noqa: E402
from peftkit.errors import UserError  # noqa: E402


@pytest.fixture
def lm_setup(tmp_path):
    """A tiny structured LLaMA dir, its 2-bit RTN quantize output dir, a WikiText-shaped dir, a recipe factory."""
    model_dir, _, data = write_quantized_setup(tmp_path, words=1200)

    def recipe(method="apiq", out="run", **train):
        t = {"max_steps": 24, "batch_size": 4, "lr": 1e-2, "seed": 3, "eval_every": 12, "log_every": 4,
             "warmup_ratio": 0.0, "threads": 1}
        t.update(train)
        name = tmp_path / "q2" if method == "apiq" else model_dir
        return {"model": {"name": str(name), "task_head": "causal_lm"},
                "data": {"task": "wikitext2", "root": str(data), "max_length": 32, "eval_limit": 6},
                "method": {"name": method, **({"r": 8} if method == "lora" else {})},
                "train": t, "output": {"dir": str(tmp_path / out)}}

    return {"recipe": recipe, "model_dir": model_dir, "quant_dir": tmp_path / "q2", "data": data}


def _write(tmp_path, recipe, name):
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_apiq_fine_tune_lowers_perplexity_and_peftkit_eval_reproduces_it(lm_setup, tmp_path):
    from peftkit.commands.evaluate import evaluate

    run_dir = finetune(_write(tmp_path, lm_setup["recipe"](), "apiq"), [])
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["task"] == "wikitext2" and m["method"] == "apiq" and m["steps"] == 24
    assert m["eval_windows"] == 6 and m["eval_seq_len"] == 32 and m["eval_tokens"] == 6 * 31
    assert m["ppl"] < 0.9 * m["ppl_start"], m  # 126 -> 107: LoRA alone, on a frozen random lm_head, in 24 steps
    assert "gradient checkpointing on" in (run_dir / "train.log").read_text()  # the quantized base's default
    assert 0 < m["trainable_pct"] < 100 and m["train_windows"] > 20
    evals = [json.loads(line)["eval"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["ppl"] for e in evals] and m["ppl"] == pytest.approx(min(e["ppl"] for e in evals))  # lower is better
    # the saved result is a peft adapter over the on-disk quantized base: reloaded from scratch it scores the same,
    # which also shows that training left the base as the quantizer wrote it
    again = evaluate("wikitext2", str(run_dir), data_root=str(lm_setup["data"]), seq_len=32, max_windows=6)["rows"][0]
    assert again["ppl"] == pytest.approx(m["ppl"], rel=1e-5)
    adapter = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(lm_setup["quant_dir"])


def test_only_lora_trains_on_the_quantized_base(lm_setup):
    from types import SimpleNamespace

    from helpers.quant import windows

    from peftkit.config.schema import TrainArgs
    from peftkit.methods import create_method
    from peftkit.tasks.causal_lm import collate_windows
    from peftkit.train.trainer import Trainer

    method = create_method("apiq")
    model = method.prepare(method.load_base(SimpleNamespace(name=str(lm_setup["quant_dir"])), "causal_lm"))
    before = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    opts = TrainArgs(weight_decay=0.0, lr=1e-2, batch_size=4, epochs=1.0, max_steps=5, warmup_ratio=0.0,
                     schedule="constant", keep_last=1, seed=0, log_every=5, select_best=False)
    trainer = Trainer(model, method, opts, Path(lm_setup["data"]) / "run", [{"input_ids": w} for w in windows(12, 16)],
                      collate_windows,
                      log=lambda s: None)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.cpu(), before[n])}  # the trainer may move it to a GPU
    assert changed and all("lora_" in n for n in changed)  # LoRA moved ...
    assert all(torch.equal(p.cpu(), before[n]) for n, p in model.named_parameters() if "lora_" not in n)  # ... nothing else
    assert all("lora_" in k for k in method.trainable_state(model))  # checkpoints and final/ hold LoRA alone


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fp_reference_methods_fine_tune_a_plain_causal_lm(lm_setup, tmp_path, method):
    from peftkit.commands.evaluate import evaluate

    run_dir = finetune(_write(tmp_path, lm_setup["recipe"](method, out=method, max_steps=12, eval_every=None), method), [])
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["ppl"] < m["ppl_start"] and m["steps"] == 12
    assert (m["trainable_pct"] == 100) == (method == "full")
    assert "gradient checkpointing" not in (run_dir / "train.log").read_text()  # off unless asked for
    again = evaluate("wikitext2", str(run_dir), data_root=str(lm_setup["data"]), seq_len=32, max_windows=6)["rows"][0]
    assert again["ppl"] == pytest.approx(m["ppl"], rel=1e-5)


def test_bad_lm_recipes_are_refused_before_a_run_dir_exists(lm_setup, tmp_path):
    make = lm_setup["recipe"]
    cases = [
        ({"model": {"name": str(lm_setup["model_dir"])}}, "task_head"),  # seq_cls head (the default) on wikitext2
        ({"method": {"name": "hiwi"}}, "only wired for seq_cls heads"),
        ({"data": {"task": "wikitext2", "root": str(tmp_path / "nowhere")}}, "PEFTKIT_WIKITEXT"),
        ({"data": {"task": "sst2"}}, "not the GLUE task .sst2."),
        ({"data": {"task": "wikitext2", "root": str(lm_setup["data"]), "max_length": 4096}}, "data.max_length"),
    ]
    for i, (change, needle) in enumerate(cases):
        recipe = make("lora", out=f"bad{i}")
        recipe.update(change)
        with pytest.raises(UserError, match=needle):
            finetune(_write(tmp_path, recipe, f"bad{i}"), [])
        assert not (tmp_path / f"bad{i}").exists()


def test_perplexity_refuses_a_classification_run(tmp_path):
    from functools import partial

    from peftkit.artifacts.load import load_run
    from peftkit.tasks.causal_lm import CausalLMText

    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "peftkit.json").write_text(json.dumps(
        {"method": "lora", "options": {}, "model": {"name": "minilm-l6", "task_head": "seq_cls"}}))
    with pytest.raises(UserError, match="seq_cls head"):  # from the record, before any weights load
        load_run(str(tmp_path / "run"), plain_head="causal_lm", check=partial(CausalLMText.check_run, "run"))
