"""Every default location comes from peftkit/paths.py: read from the environment, else one clear error; no path
beside the checkout is baked into package code."""

import re
from pathlib import Path

import pytest
from helpers.reliability import invoke

from peftkit import paths
from peftkit.errors import UserError

PACKAGE = Path(__file__).resolve().parents[1] / "peftkit"


def test_no_package_file_names_a_folder_beside_the_checkout():
    """The data of this repository's machine (../shared/data) is the Makefile's and the tests' business."""
    found = [f"{p.relative_to(PACKAGE.parent)}:{n}: {line.strip()}" for p in sorted(PACKAGE.rglob("*.py"))
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\.\./shared|shared/data|[\"']shared[\"']\s*/|/\s*[\"']shared[\"']", line)]
    assert not found, "locations beside the checkout in package code:\n" + "\n".join(found)


def test_wikitext_without_the_variable_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("PEFTKIT_WIKITEXT", raising=False)
    with pytest.raises(UserError, match="PEFTKIT_WIKITEXT"):
        paths.wikitext_root()
    monkeypatch.setenv("PEFTKIT_WIKITEXT", "/data/wt")
    assert paths.wikitext_root() == "/data/wt"


def test_eval_on_wikitext_without_a_directory_says_where_to_set_it(monkeypatch, tmp_path):
    monkeypatch.delenv("PEFTKIT_WIKITEXT", raising=False)
    result = invoke("eval", "--task", "wikitext2", "--model", str(tmp_path / "run"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "PEFTKIT_WIKITEXT" in result.output and "--data-root" in result.output


def test_glue_root_is_the_variable_or_the_hub(monkeypatch):
    monkeypatch.delenv("PEFTKIT_DATA_DIR", raising=False)
    assert paths.glue_root() is None  # the hub's copy (datasets' cache offline)
    monkeypatch.setenv("PEFTKIT_DATA_DIR", "/data/glue")
    assert paths.glue_root() == "/data/glue"


def test_cache_is_the_variable_expanded_or_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PEFTKIT_CACHE", raising=False)
    assert paths.cache_dir() == tmp_path / ".cache" / "peftkit"
    monkeypatch.setenv("PEFTKIT_CACHE", "~/elsewhere")
    assert paths.cache_dir() == tmp_path / "elsewhere"


def test_the_recipes_are_found_in_the_source_tree():
    assert any(paths.configs_dir().glob("*/*.yaml"))
