"""The quantize recipe: every problem reported at once by key path; group size checked against the model."""

import pytest
from helpers.quant import write_model_dir, write_wikitext

from peftkit.config.loader import load_recipe
from peftkit.errors import UserError


@pytest.fixture
def setup(tmp_path):
    model_dir = write_model_dir(tmp_path / "model")
    data = write_wikitext(tmp_path / "wikitext")
    return {"model": {"name": str(model_dir)}, "calib": {"root": str(data)}, "quant": {"group_size": 16}}


def test_valid_recipe_with_overrides(setup, tmp_path):
    recipe = load_recipe(setup, kind="quantize", overrides= ["quant.bits=3", "quant.method=loftq", "output.dir=" + str(tmp_path / "out")])
    assert recipe.quant.bits == 3 and recipe.quant.method == "loftq" and recipe.run_dir == tmp_path / "out"
    assert recipe.calib.file == "wiki.valid.tokens"


def test_bad_bits_method_and_unknown_key_are_listed_together(setup):
    with pytest.raises(UserError) as e:
        load_recipe(setup, kind="quantize", overrides= ["quant.bits=5", "quant.method=awq", "quant.lr=1", "calib.seq_len=1"])
    msg = str(e.value)
    for key in ("quant.bits", "quant.method", "quant.lr: unknown option", "calib.seq_len"):
        assert key in msg, msg
    assert "4 problems" in msg


def test_group_size_must_divide_the_model_widths(setup):
    with pytest.raises(UserError, match=r"quant.group_size: 48 does not divide the input width 64 of self_attn.q_proj.*e\.g\. 64"):
        load_recipe(setup, kind="quantize", overrides= ["quant.group_size=48"])
    with pytest.raises(UserError, match="quant.group_size: must be >= 1 and <= 65536, got 0"):
        load_recipe(setup, kind="quantize", overrides= ["quant.group_size=0"])


def test_missing_calibration_file_and_bad_model(setup, tmp_path):
    with pytest.raises(UserError) as e:
        load_recipe(setup, kind="quantize", overrides= [f"calib.root={tmp_path / 'nowhere'}", f"model.name={tmp_path / 'nomodel'}"])
    assert "calib.root/calib.file" in str(e.value) and "model.name" in str(e.value)


def test_symmetric_is_refused_for_normal_float(setup):
    with pytest.raises(UserError, match="quant.symmetric"):
        load_recipe(setup, kind="quantize", overrides= ["quant.method=nf", "quant.symmetric=true"])


def test_lora_targets_must_name_projections_of_the_family(setup):
    assert load_recipe(setup, kind="quantize", overrides= ["quant.lora_targets=[q_proj, v_proj]"]).quant.lora_targets == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match=r"quant.lora_targets: \['query'\]"):
        load_recipe(setup, kind="quantize", overrides= ["quant.lora_targets=[query, v_proj]"])
