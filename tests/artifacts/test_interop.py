"""The interop matrix: every method x {--merge, --no-merge} x {transformers, peft, peftkit} loader.

For each cell the matrix (peftkit.artifacts.export.interop_rows, the source of docs/interop.md) declares either how
the loader serves the export or why it does not apply. Each declared loader is run here the way a user would run it
-- transformers and peft directly, the delta through the apply_delta.py file shipped in the export, peftkit through
peftkit.load -- and its logits must equal those of peftkit's own loaded run (load_run) within 1e-4 in fp32.
A cell declared not applicable must lack what that loader reads."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from peftkit.commands.export import export
from peftkit.commands.train import finetune
from peftkit.errors import UserError
from peftkit.artifacts.export import interop_rows
from peftkit.artifacts.load import load_run

TOLERANCE = 1e-4
CASES = {  # matrix row name -> method options of a cheap run that moves more than the head
    "full": {}, "bitfit": {}, "pafi": {"rho": 0.3}, "hiwi-weight": {"target": "weight", "r": 16},
    "hiwi-bias": {"target": "bias", "r": 16}, "lora": {}, "supertuning": {"rho": 0.3}, "meft1": {}, "meft2": {},
    "meft3": {}, "head-only": {},
}
HEAD_ONLY = ("head-only",)  # cases whose run must leave the body as it was
LR = {"hiwi": 0.2}
SENTENCES = ["good movie", "the plot was awful and boring", "a fun story but the ending was bad"]


def matrix_row(method: str, merge: bool) -> dict:
    flag = "--merge" if merge else "--no-merge"
    return next(r for r in interop_rows() if r["method"] == method and r["export"] == flag)


def logits_of(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


def shipped_apply_delta(directory):
    """apply_delta from the export's own apply_delta.py, imported as a file (not from peftkit)."""
    spec = importlib.util.spec_from_file_location(f"apply_delta_{abs(hash(str(directory)))}", directory / "apply_delta.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.__name__.startswith("peftkit")
    return module.apply_delta


def base_of(directory, export_info):
    from transformers import AutoModelForSequenceClassification

    ref = export_info["export"]["base"]
    assert ref == "base" and (directory / "base" / "config.json").is_file()  # a local tiny base is copied along
    return AutoModelForSequenceClassification.from_pretrained(directory / "base")


def load_with(loader: str, directory, fmt: str):
    """The model as ``loader`` loads the export, written here without peftkit's export code (except peftkit.load)."""
    from transformers import AutoModelForSequenceClassification

    info = json.loads((directory / "export.json").read_text())
    if loader == "peftkit":
        import peftkit

        return peftkit.load(directory)[0]
    if loader == "transformers" and fmt == "transformers":
        return AutoModelForSequenceClassification.from_pretrained(directory)
    if loader == "transformers" and fmt == "delta":
        return shipped_apply_delta(directory)(base_of(directory, info), directory)
    if loader == "peft" and fmt == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(base_of(directory, info), directory)
    raise AssertionError(f"the matrix declares {loader} for the {fmt} format, which this test cannot check")


NEEDS = {"transformers": ("config.json", "model.safetensors"), "peft": ("adapter_config.json",)}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_interop_matrix(case, tiny_run_setup, tmp_path, capsys):
    method = case if case in HEAD_ONLY else case.split("-")[0]
    recipe = tiny_run_setup(method, out=f"run-{case}", max_steps=3, save_every=3, eval_every=3,
                            lr=LR.get(method, 0.03), warmup_ratio=0.0)
    recipe["method"].update(CASES[case])
    give_biases(recipe["model"]["name"])
    run = finetune(recipe, [])
    reference_model, tokenizer, _ = load_run(run)
    reference = logits_of(reference_model, tokenizer)
    merged_run = None
    if method not in ("meft1", "meft2", "meft3"):
        import peftkit

        merged_run = {k: v.clone() for k, v in peftkit.load(run)[0].state_dict().items()}
        if case in HEAD_ONLY:
            assert body_moved(recipe["model"]["name"], merged_run) == 0, case
        else:
            assert body_moved(recipe["model"]["name"], merged_run) > 1e-3, case  # a lost body change would show
    for merge in (True, False):
        row = matrix_row(method, merge)
        out = tmp_path / f"export-{case}-{'merged' if merge else 'unmerged'}"
        if row["format"] == "refused":
            with pytest.raises(UserError, match="--no-merge"):
                export(str(run), str(out), merge)
            assert not out.exists() and not list(tmp_path.glob(".export-*"))  # nothing half-written
            continue
        export(str(run), str(out), merge)
        printed = capsys.readouterr().out
        info = json.loads((out / "export.json").read_text())
        assert info["export"]["format"] == row["format"] and str(out) in printed
        assert (out / "README.md").is_file() and "trivial baseline" in (out / "README.md").read_text()
        if row["format"] == "transformers":
            config = json.loads((out / "config.json").read_text())
            assert config["id2label"] == {"0": "negative", "1": "positive"}
            assert not any(".parametrizations." in k or "lora_" in k for k in _tensor_names(out / "model.safetensors"))
            if not method.startswith("meft"):  # the base architecture again: the base's cost per forward
                from helpers.tiny import assert_base_architecture
                from transformers import AutoModelForSequenceClassification

                assert_base_architecture(AutoModelForSequenceClassification.from_pretrained(out),
                                         AutoModelForSequenceClassification.from_pretrained(recipe["model"]["name"]))
        own_base = str((out / "base").resolve())  # what adapter_config.json names, for peft's AutoPeftModel
        for path in out.rglob("*.json"):  # nothing points back at the machine that trained it (export.json: provenance)
            assert path.name == "export.json" or str(tmp_path) not in path.read_text().replace(own_base, ""), path
        if row["format"] == "peft":
            assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == own_base
        if row["format"] == "delta":
            assert "delta.safetensors" in printed and "% " in printed  # its size next to the base model's
        for loader in ("transformers", "peft", "peftkit"):
            if row[loader].startswith("n/a"):
                assert not all((out / f).is_file() for f in NEEDS[loader]), (case, merge, loader)
                continue
            loaded = load_with(loader, out, row["format"])
            got = logits_of(loaded, tokenizer)
            assert (got - reference).abs().max().item() <= TOLERANCE, (case, merge, loader)
            if merged_run is not None:
                assert_same_weights(loaded, merged_run, (case, merge, loader))
        # `peftkit eval`'s loader reads the export too
        again, _, _ = load_run(out)
        assert (logits_of(again, tokenizer) - reference).abs().max().item() <= TOLERANCE


def give_biases(model_dir):
    """Non-zero biases, as a pretrained model has (the tiny model starts with zeros, which HiWi cannot move)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(model_dir)


def body_moved(base_name, merged_state) -> float:
    """Largest change the run made to a tensor outside the task head."""
    from transformers import AutoModelForSequenceClassification

    from peftkit.methods.base import is_head_parameter

    base = AutoModelForSequenceClassification.from_pretrained(base_name).state_dict()
    return max((merged_state[k] - v).abs().max().item() for k, v in base.items() if not is_head_parameter(k))


def assert_same_weights(model, reference: dict, where) -> None:
    """Every tensor of the loaded model (merged by peft's own merge_and_unload where it is a peft model) equals the
    run's merged tensor."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    state = model.state_dict()
    assert set(state) == set(reference), where
    worst = max((state[k].float() - reference[k].float()).abs().max().item() for k in reference)
    assert worst <= 1e-6, (where, worst)


def _tensor_names(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_every_registered_method_has_both_rows():
    from peftkit.utils.registry import METHODS

    rows = interop_rows()
    for name in METHODS.names():
        assert {r["export"] for r in rows if r["method"] == name} == {"--merge", "--no-merge"}
    tested = {c if c in HEAD_ONLY else c.split("-")[0] for c in CASES} | {"apiq"}  # apiq: test_decoders.py
    assert tested == set(METHODS.names()), "a method without a run in the interop test"


@pytest.mark.parametrize("method, merged, unmerged", [
    ("full", "transformers", "transformers"), ("bitfit", "transformers", "delta"), ("pafi", "transformers", "delta"),
    ("hiwi", "transformers", "delta"), ("lora", "transformers", "peft"), ("supertuning", "transformers", "peft"),
    ("apiq", "transformers", "peftkit"), ("meft1", "refused", "peftkit"), ("meft2", "refused", "peftkit"),
    ("meft3", "refused", "peftkit"), ("head-only", "transformers", "delta")])
def test_what_each_method_exports(method, merged, unmerged):
    assert (matrix_row(method, True)["format"], matrix_row(method, False)["format"]) == (merged, unmerged)
