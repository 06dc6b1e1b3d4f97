"""A model directory is checked before any loader sees it: one UserError naming the file and what is expected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers.reliability import invoke, make_setup, recipe, write_recipe

from peftkit.errors import UserError
from peftkit.models.families import FAMILIES
from peftkit.models.load import check_model_dir, load_model


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    from helpers.tiny import save_tiny_classifier

    return save_tiny_classifier(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture
def copy(good, tmp_path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "model"))


def _refused(directory: Path, *needles: str) -> str:
    with pytest.raises(UserError) as e:
        load_model(str(directory), "seq_cls", 2)
    text = str(e.value)
    assert text.startswith(f'cannot load model "{directory}"'), text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


def test_a_good_directory_passes_and_loads(good):
    assert check_model_dir(good)["model_type"] == "bert"
    assert load_model(str(good), "seq_cls", 2).config.model_type == "bert"


@pytest.mark.parametrize("content, problem", [
    (None, "does not exist"),
    ('{"model_type": "bert", ', "is not valid JSON"),
    (b"\xff\xfe\x00garbage", "is not valid JSON"),
    ('["bert"]', "has no model_type"),
    ('{"hidden_size": 32}', "has no model_type"),
])
def test_missing_or_malformed_config(copy, content, problem):
    config = copy / "config.json"
    if content is None:
        config.unlink()
    elif isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    _refused(copy, str(config), problem, "config.json: a JSON object with model_type")


def test_unsupported_architecture_names_the_supported_ones(copy):
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    _refused(copy, "model_type 't5'", "Supported model types: " + ", ".join(FAMILIES))


def test_pickle_only_weights_are_refused_without_unpickling(copy, monkeypatch):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(copy / "model.safetensors")), copy / "pytorch_model.bin")
    (copy / "model.safetensors").unlink()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a model directory's pickle file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    _refused(copy, str(copy / "pytorch_model.bin"), "pickle", "save_pretrained", "safe_serialization=True")


def test_no_weights_at_all(copy):
    (copy / "model.safetensors").unlink()
    _refused(copy, "holds no weights", "model.safetensors")


@pytest.mark.parametrize("damage", ["truncated", "header-length-huge", "header-not-json", "empty", "padded"])
def test_corrupt_safetensors(copy, damage):
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    broken = {
        "truncated": data[: len(data) - 100],
        "header-length-huge": (10**12).to_bytes(8, "little") + data[8:],
        "header-not-json": data[:8] + b"#" * 16 + data[24:],
        "empty": b"",
        "padded": data + b"\x00" * 8,
    }[damage]
    weights.write_bytes(broken)
    _refused(copy, str(weights), "not a valid safetensors file", "copy or download it again")


def test_a_shard_index_cannot_point_outside_the_directory(copy, tmp_path):
    shutil.move(copy / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (copy / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"bert.embeddings.word_embeddings.weight": "../elsewhere.safetensors"}}))
    _refused(copy, "outside the directory")


def test_a_sharded_model_with_a_missing_shard(copy):
    shutil.move(copy / "model.safetensors", copy / "model-00001-of-00002.safetensors")
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    _refused(copy, "model-00002-of-00002.safetensors", "does not exist")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("modeldir"))


def test_finetune_on_pickle_weights_exits_2_before_a_run_dir_exists(setup, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = Path(shutil.copytree(setup["model"], tmp_path / "pickled"))
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    r = recipe(setup, "never-created")
    r["model"]["name"] = str(model)
    result = invoke("finetune", write_recipe(tmp_path / "r.yaml", r))
    assert result.exit_code == 2, result.output
    assert "pytorch_model.bin" in result.output and "Traceback" not in result.output
    assert not (Path(setup["root"]) / "never-created").exists()
