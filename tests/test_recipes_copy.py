"""Top-level options, where the shipped recipes live (configs/<group>/, found by flat names) and `peftkit recipes
copy`: a shipped recipe copied byte for byte, never over a file."""

import pytest
from typer.testing import CliRunner

from peftkit import __version__
from peftkit.cli import app
from peftkit.config.loader import RECIPE_GROUPS, configs_dir, load_recipe, resolve_recipe_path, shipped_recipes

runner = CliRunner()


def test_version_and_short_help():
    assert runner.invoke(app, ["--version"]).output.strip() == f"peftkit {__version__}"
    assert runner.invoke(app, ["-V"]).output.strip() == f"peftkit {__version__}"
    for args in (["-h"], ["finetune", "-h"], ["recipes", "copy", "-h"]):
        out = runner.invoke(app, args)
        assert out.exit_code == 0 and "Usage:" in out.output, args


def test_copy_into_a_folder_and_to_a_file(tmp_path):
    out = runner.invoke(app, ["recipes", "copy", "pafi-r0.005-minilm-sst2", str(tmp_path)])
    assert out.exit_code == 0, out.output
    copied = tmp_path / "pafi-r0.005-minilm-sst2.yaml"
    assert copied.read_bytes() == shipped_recipes()["pafi-r0.005-minilm-sst2"].read_bytes()
    assert f"peftkit finetune {copied}" in out.output
    mine = tmp_path / "mine.yaml"
    assert runner.invoke(app, ["recipes", "copy", "quant-rtn-smollm2-2bit.yaml", str(mine)]).exit_code == 0
    assert load_recipe(str(mine)).kind == "quantize"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


@pytest.mark.parametrize("make, name, needle", [
    (lambda d: (d / "x.yaml").write_text("mine"), "lora-minilm-sst2", "already exists"),
    (lambda d: None, "lora-minilm-sst", 'did you mean "lora-minilm-sst2"'),
])
def test_copy_refuses_and_leaves_files_alone(tmp_path, make, name, needle):
    make(tmp_path)
    out = runner.invoke(app, ["recipes", "copy", name, str(tmp_path / "x.yaml")])
    assert out.exit_code == 2 and needle in out.output
    if (tmp_path / "x.yaml").exists():
        assert (tmp_path / "x.yaml").read_text() == "mine"
    assert len(list(tmp_path.iterdir())) <= 1


def test_copy_into_a_missing_folder_is_a_user_error(tmp_path):
    out = runner.invoke(app, ["recipes", "copy", "lora-minilm-sst2", str(tmp_path / "no" / "x.yaml")])
    assert out.exit_code == 2 and "does not exist" in out.output


def test_recipe_names_are_unique_across_the_groups():
    """`peftkit finetune NAME` takes no group, so one name in two groups would make one recipe unreachable."""
    files = sorted(configs_dir().glob("*/*.yaml"))
    stems = [p.stem for p in files]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    assert twice == [], f"recipe names in more than one group: {twice}"
    assert {p.parent.name for p in files} == set(RECIPE_GROUPS)
    assert list(configs_dir().glob("*.yaml")) == []  # every recipe sits in a group
    assert len(shipped_recipes()) == len(files)


@pytest.mark.parametrize("name, group", [("lora-minilm-sst2", "glue"), ("demo-lora-minilm-sst2.yaml", "glue"),
                                         ("ft-wikitext2-smollm2-lora", "lm"), ("quant-rtn-smollm2-2bit", "quantize"),
                                         ("pretrain-mlm-small", "pretrain")])
def test_flat_names_find_the_recipe_in_its_group(name, group):
    path = resolve_recipe_path(name)
    assert path.parent == configs_dir() / group and path.stem == name.removesuffix(".yaml")


def test_recipes_list_names_every_recipe_with_its_group():
    out = runner.invoke(app, ["recipes", "list"])
    assert out.exit_code == 0, out.output
    listed = {line.split()[0]: line.split()[1] for line in out.output.splitlines() if line.strip()}
    assert listed == {name: path.parent.name for name, path in shipped_recipes().items()}
