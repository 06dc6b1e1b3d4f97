"""`peftkit export`: where it may write, what it refuses, its model card and sizes, decoders (generation config,
ApiQ on a quantized base), loading a merged export with no peftkit importable, and docs/interop.md kept fresh."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftkit.commands.export import export
from peftkit.commands.train import finetune
from peftkit.errors import RunFailed, UserError
from peftkit.artifacts.load import load_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pafi_run(tiny_run_setup):
    recipe = tiny_run_setup("pafi", out="run-pafi", max_steps=2, save_every=2, eval_every=2, lr=0.03)
    recipe["method"]["rho"] = 0.3
    return finetune(recipe, [])


def test_docs_interop_is_fresh():
    from peftkit.artifacts.export import interop_markdown

    assert (ROOT / "docs" / "interop.md").read_text() == interop_markdown(), \
        "docs/interop.md is stale: run python scripts/make_interop.py"


def test_a_users_folder_is_never_written(pafi_run, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        export(str(pafi_run), str(mine))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="inside the run"):
        export(str(pafi_run), str(pafi_run / "exported"))
    with pytest.raises(UserError, match="current directory"):
        export(str(pafi_run), ".")
    file_out = tmp_path / "a-file"
    file_out.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        export(str(pafi_run), str(file_out))
    with pytest.raises(UserError, match="not a directory"):
        export(str(tmp_path / "no-such-run"), str(tmp_path / "out"))
    assert not list(tmp_path.glob(".export-*")) and not (tmp_path / "out").exists()


def test_an_empty_folder_is_used_and_a_failure_leaves_nothing(pafi_run, tmp_path, monkeypatch):
    from peftkit.artifacts import delta as delta_format

    empty = tmp_path / "empty"
    empty.mkdir()
    out = export(str(pafi_run), str(empty), False)
    marker = json.loads((out / ".peftkit-run").read_text())
    assert marker["kind"] == "export" and set(marker["written"]) == {p.name for p in out.iterdir()} - {".peftkit-run"}

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(delta_format, "write_delta", broken)
    with pytest.raises(RunFailed, match="could not write the export .*No space left on device"):
        export(str(pafi_run), str(tmp_path / "second"), False)
    assert not (tmp_path / "second").exists() and not list(tmp_path.glob(".export-*"))


def test_model_card_and_sizes(pafi_run, tmp_path, capsys):
    out = export(str(pafi_run), str(tmp_path / "delta"), False)
    printed = capsys.readouterr().out
    card = (out / "README.md").read_text()
    metrics = json.loads((pafi_run / "metrics.json").read_text())
    for needle in ("pafi", "rho=0.3", "sst2", "trivial baseline", f"{metrics['trainable_params']:,}",
                   "peftkit 0.1.0", f"peftkit export {pafi_run} --out {out} --no-merge", "kind: finetune",
                   "0 negative, 1 positive", f'apply_delta(AutoModelForSequenceClassification.from_pretrained("{out}/base")'):
        assert needle in card, needle
    delta = (out / "delta.safetensors").stat().st_size
    base = sum(f.stat().st_size for f in Path(json.loads((pafi_run / "final" / "peftkit.json").read_text())["model"]["name"])
               .glob("*.safetensors"))
    share = f"{100 * delta / base:.2f}%"
    assert share in printed and share in card  # the delta's size next to the base model's
    assert "(base model weights:" in printed


def test_meft_merge_is_refused_with_the_reason(tiny_run_setup, tmp_path):
    run = finetune(tiny_run_setup("meft1", out="run-meft", max_steps=1, save_every=1, eval_every=1), [])
    with pytest.raises(UserError, match="reversible.*--no-merge"):
        export(str(run), str(tmp_path / "merged"), True)
    assert not (tmp_path / "merged").exists()
    out = export(str(run), str(tmp_path / "meft"))  # the default for a method that cannot merge
    assert json.loads((out / "export.json").read_text())["export"]["format"] == "peftkit"


@pytest.mark.slow
@pytest.mark.subprocess
def test_merged_export_and_delta_load_with_peftkit_unimportable(pafi_run, tmp_path):
    """transformers (and the shipped apply_delta.py) in a fresh process where `import peftkit` fails."""
    merged = export(str(pafi_run), str(tmp_path / "merged"), True)
    delta = export(str(pafi_run), str(tmp_path / "delta"), False)
    script = f"""
import json, sys
sys.modules["peftkit"] = None  # any import of peftkit now raises ImportError
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
sys.path.insert(0, {str(delta)!r})
from apply_delta import apply_delta
tok = AutoTokenizer.from_pretrained({str(merged)!r})
batch = tok(["good movie", "the plot was awful"], padding=True, return_tensors="pt")
a = AutoModelForSequenceClassification.from_pretrained({str(merged)!r}).eval()
b = apply_delta(AutoModelForSequenceClassification.from_pretrained({str(delta / 'base')!r}), {str(delta)!r}).eval()
with torch.no_grad():
    print(json.dumps([a(**batch).logits.tolist(), b(**batch).logits.tolist(), a.config.id2label]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    merged_logits, delta_logits, labels = json.loads(done.stdout.strip().splitlines()[-1])
    model, tokenizer, _ = load_run(pafi_run)
    with torch.no_grad():
        reference = model(**tokenizer(["good movie", "the plot was awful"], padding=True, return_tensors="pt")).logits
    for got in (merged_logits, delta_logits):
        assert (torch.tensor(got) - reference).abs().max().item() <= 1e-4
    assert labels == {"0": "negative", "1": "positive"}


@pytest.fixture
def lm_runs(tmp_path):
    """A tiny LLaMA, its 2-bit RTN quantize output and WikiText-shaped data; (apiq run, lora run)."""
    from helpers.quant import write_quantized_setup

    model_dir, _, data = write_quantized_setup(tmp_path, words=600)

    def run(method):
        name = tmp_path / "q2" if method == "apiq" else model_dir
        return finetune({"model": {"name": str(name), "task_head": "causal_lm"},
                         "data": {"task": "wikitext2", "root": str(data), "max_length": 32, "eval_limit": 2},
                         "method": {"name": method}, "output": {"dir": str(tmp_path / f"run-{method}")},
                         "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "seed": 3, "eval_every": 2,
                                   "warmup_ratio": 0.0, "threads": 1}}, [])

    return run("apiq"), run("lora")


@pytest.mark.slow
def test_decoders_export_with_generation_config(lm_runs, tmp_path):
    """ApiQ (LoRA on a quantized base) and LoRA on a causal LM: the merged export is a plain AutoModelForCausalLM with
    a generation config; ApiQ unmerged keeps its quantized base (copied) and loads through peftkit."""
    from transformers import AutoModelForCausalLM

    import peftkit

    ids = torch.randint(5, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    for run in lm_runs:
        model, _, _ = load_run(run)
        with torch.no_grad():
            reference = model(input_ids=ids).logits
        # apiq: the full-precision merge (its default --merge is the low-bit one, tests/artifacts/test_lowbit_merge.py)
        merged = export(str(run), str(tmp_path / f"{run.name}-merged"), True,
                        merge_mode="float" if run == lm_runs[0] else None)
        assert (merged / "generation_config.json").is_file()
        plain = AutoModelForCausalLM.from_pretrained(merged).eval()
        assert type(plain).__name__ == "LlamaForCausalLM"
        with torch.no_grad():
            assert (plain(input_ids=ids).logits - reference).abs().max().item() <= 1e-4
    apiq = export(str(lm_runs[0]), str(tmp_path / "apiq-unmerged"), False)
    assert json.loads((apiq / "export.json").read_text())["export"]["format"] == "peftkit"
    assert (apiq / "base" / "quantization.json").is_file() and not (apiq / "base" / ".peftkit-run").exists()
    assert json.loads((apiq / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (apiq / "base").resolve())  # absolute: peft resolves a relative name against the working directory
    model, _, _ = load_run(lm_runs[0])
    loaded, _ = peftkit.load(apiq)
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item() <= 1e-4


def test_import_peftkit_stays_light():
    done = subprocess.run([sys.executable, "-c", "import sys, peftkit; assert callable(peftkit.load); "
                           "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_a_plain_checkpoint_directory_is_exported_as_it_is(tmp_path):
    """A directory without peftkit metadata but with a transformers config (what pretraining leaves in final/)."""
    from helpers.tiny import save_tiny_classifier
    from transformers import AutoModelForSequenceClassification

    source = save_tiny_classifier(tmp_path / "plain")
    out = export(str(source), str(tmp_path / "out"))
    assert json.loads((out / "export.json").read_text())["export"]["format"] == "transformers"
    a = AutoModelForSequenceClassification.from_pretrained(source).state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and (out / "README.md").is_file()
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(UserError, match="neither a peftkit run"):
        export(str(tmp_path / "not-a-run"), str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()
