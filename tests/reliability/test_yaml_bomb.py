"""load_yaml_bounded: what yaml.safe_load reads, minus alias bombs, self-references and absurd nesting."""

from __future__ import annotations

import time

import pytest
import yaml

from peftkit.errors import UserError
from peftkit.utils.safe_yaml import expanded_size, load_yaml_bounded


def _laughs(levels: int, width: int = 10) -> str:
    """The billion-laughs shape: each level a list of ``width`` aliases to the level below (width**levels leaves)."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_fast():
    # 10**6 strings expanded: past the bound, yet small enough that a broken guard fails here instead of
    # exhausting the machine (the full 10**9 bomb is measured through expanded_size below)
    start = time.perf_counter()
    with pytest.raises(UserError, match="expands to more than 100,000 values") as e:
        load_yaml_bounded(_laughs(6), source="recipe bomb.yaml")
    assert time.perf_counter() - start < 2.0
    assert "recipe bomb.yaml" in str(e.value)
    bomb = _laughs(9)  # ~10**9 strings once expanded; yaml.safe_load would try to build every one
    assert len(bomb) < 1000
    start = time.perf_counter()
    assert expanded_size(yaml.compose(bomb), max_nodes=100_000, max_depth=50) == 100_001  # capped, not counted out
    assert time.perf_counter() - start < 2.0


def test_a_small_expansion_is_read_like_safe_load():
    text = _laughs(2) + "base: &b {lr: 0.1, seed: 3}\ntrain:\n  <<: *b\n  seed: 4\nwhen: 2024-02-03\n"
    assert load_yaml_bounded(text) == yaml.safe_load(text)
    assert load_yaml_bounded("") is None and load_yaml_bounded("3") == 3


def test_the_bound_counts_expanded_nodes_exactly():
    text = _laughs(3)  # 10**3 leaves under l3 alone
    root = yaml.compose(text)
    size = expanded_size(root, max_nodes=10**9, max_depth=50)
    assert size == yaml_size(yaml.safe_load(text))
    assert load_yaml_bounded(text, max_nodes=size) is not None
    with pytest.raises(UserError):
        load_yaml_bounded(text, max_nodes=size - 1)


def yaml_size(value) -> int:
    """Nodes of a constructed value the way the composer counts them (a mapping: 1 + keys + values)."""
    if isinstance(value, list):
        return 1 + sum(yaml_size(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(1 + yaml_size(v) for v in value.values())
    return 1


def test_an_anchor_inside_itself_is_refused():
    with pytest.raises(UserError, match="refers to itself"):
        load_yaml_bounded("a: &a [1, *a]\n")
    with pytest.raises(UserError, match="refers to itself"):
        load_yaml_bounded("a: &m {k: *m}\n")


@pytest.mark.parametrize("depth", [300, 5000])
def test_absurd_nesting_is_a_user_error_not_a_crash(depth):
    with pytest.raises(UserError, match="nested"):
        load_yaml_bounded("[" * depth + "]" * depth)


def test_syntax_errors_still_reach_the_caller_with_their_position():
    with pytest.raises(yaml.YAMLError) as e:
        load_yaml_bounded("train: [1, 2\n")
    assert e.value.problem_mark is not None
    with pytest.raises(yaml.constructor.ConstructorError):
        load_yaml_bounded("x: !!python/object/apply:os.system ['true']\n")  # still the safe loader
