"""`peftkit quantize` writes a run directory like every other command: config.yaml, env.json, the marker, and the
lock while it runs (a second process is refused)."""

import json

import pytest
import yaml
from helpers.quant import write_model_dir, write_wikitext

from peftkit.errors import UserError


@pytest.fixture
def recipe(tmp_path):
    model_dir = write_model_dir(tmp_path / "model")
    data = write_wikitext(tmp_path / "wikitext")
    raw = {"kind": "quantize", "model": {"name": str(model_dir)}, "calib": {"root": str(data), "n_windows": 2, "seq_len": 16},
           "quant": {"method": "rtn", "bits": 2, "group_size": 16, "lora_r": 4}, "output": {"dir": str(tmp_path / "q")}}
    path = tmp_path / "quant.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_quantize_output_is_a_run_directory(recipe, tmp_path):
    from peftkit.commands.quantize import quantize
    from peftkit.train.rundir import MARKER

    out = quantize(str(recipe))
    for name in ("config.yaml", "env.json", "train.log", MARKER, "quantization.json", "model.safetensors"):
        assert (out / name).exists(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["kind"] == "quantize" and config["quant"]["method"] == "rtn"
    assert "torch" in json.loads((out / "env.json").read_text())


def test_quantize_takes_the_lock(recipe, tmp_path):
    from peftkit.commands.quantize import quantize
    from peftkit.train.rundir import RunDir

    with RunDir(tmp_path / "q", {"kind": "quantize"}, resume=False, overwrite=False):
        with pytest.raises(UserError, match="in use by another run"):
            quantize(str(recipe))


@pytest.mark.parametrize("overwrite", [False, True])
def test_quantize_into_a_users_folder_leaves_it_byte_identical(recipe, tmp_path, overwrite):
    from peftkit.commands.quantize import quantize

    folder = tmp_path / "q"
    folder.mkdir()
    (folder / "metrics.json").write_text('{"mine": 1}')
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_bytes(b"\x00\x01 keep me")
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="did not write"):
        quantize(str(recipe), [f"output.overwrite={str(overwrite).lower()}"])
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in folder.iterdir()) == ["metrics.json", "notes"]
