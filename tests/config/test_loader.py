import pytest

from peftkit.config.loader import load_recipe, parse_override, shipped_recipes
from peftkit.errors import UserError


def test_defaults_and_overrides_are_typed():
    r = load_recipe({"method": {"name": "lora", "r": 4}}, ["train.lr=3e-4", "train.max_steps=7", "data.task=mrpc"])
    assert r.train.lr == pytest.approx(3e-4) and isinstance(r.train.lr, float)
    assert r.train.max_steps == 7 and r.data.task == "mrpc"
    assert r.method.r == 4 and r.method_name == "lora"
    assert r.to_dict()["method"] == {"name": "lora", "r": 4, "alpha": 16.0, "dropout": 0.0, "targets": None, "train_bias": False}


def test_unknown_key_gets_path_and_suggestion():
    with pytest.raises(UserError) as e:
        load_recipe({"train": {"learning_rate": 1e-3}})
    assert "train.learning_rate" in str(e.value)
    with pytest.raises(UserError) as e:
        load_recipe({"train": {"epohcs": 3}})
    assert 'did you mean "epochs"' in str(e.value)


def test_all_errors_reported_at_once():
    with pytest.raises(UserError) as e:
        load_recipe({"trian": {}, "train": {"lr": "fast", "batch_size": 0}, "model": {"task_head": "seq"}, "method": {"name": "lora", "rr": 2}})
    msg = str(e.value)
    for needle in ("trian", "train.lr", "train.batch_size", "model.task_head", "method.rr", "5 problems"):
        assert needle in msg, needle


def test_unknown_method_suggests():
    with pytest.raises(UserError) as e:
        load_recipe({"method": {"name": "lroa"}})
    assert 'did you mean "lora"' in str(e.value)


def test_malformed_yaml_reports_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1e-3\n")
    with pytest.raises(UserError) as e:
        load_recipe(str(bad))
    assert "not valid YAML" in str(e.value) and "line" in str(e.value)


def test_top_level_must_be_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError):
        load_recipe(str(bad))


def test_override_syntax():
    assert parse_override("method.rho=0.005") == (["method", "rho"], 0.005)
    with pytest.raises(UserError):
        parse_override("lr")
    with pytest.raises(UserError, match="needs a section"):
        load_recipe({}, ["lr=3"])


def test_missing_recipe_name_suggests():
    with pytest.raises(UserError) as e:
        load_recipe("lora-minilm-sst")
    assert "lora-minilm-sst2" in str(e.value)


@pytest.mark.parametrize("path", sorted(shipped_recipes().values()), ids=lambda p: p.stem)
def test_every_shipped_recipe_is_valid(path):
    load_recipe(str(path))
