"""Property-based fuzzing of the recipe loader and the GLUE data loader: a result or a UserError, never
another exception, and never a file written."""

from __future__ import annotations

import json
import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftkit.config.loader import load_recipe
from peftkit.errors import UserError
from peftkit.tasks.glue import load_rows

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SECTION_KEYS = {
    "model": ["name", "task_head", "dtype", "trust_remote_code", "attn_implementation"],
    "data": ["task", "root", "max_length", "limit", "eval_limit", "train_split", "eval_split"],
    "method": ["name", "r", "alpha", "dropout", "targets", "rho", "patterns", "bias"],
    "train": ["epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "adam_betas", "warmup_ratio",
              "schedule", "max_grad_norm", "eval_every", "save_every", "keep_last", "seed", "resume", "threads"],
    "output": ["dir", "overwrite"],
}
METHOD_NAMES = ["full", "lora", "bitfit", "pafi", "hiwi", "meft1", "meft2", "meft3", "qlora", "nope", ""]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["auto", "false", "null", "1e-3", "-1", "nan", "inf", "lora", "..", "a\x00b"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


@st.composite
def recipe_dicts(draw):
    raw = {}
    for section, keys in SECTION_KEYS.items():
        if draw(st.booleans()):
            continue
        if draw(st.integers(0, 9)) == 0:
            raw[section] = draw(values)  # a section that is not a mapping
            continue
        chosen = draw(st.lists(st.sampled_from(keys + ["bogus", "lr"]), max_size=4, unique=True))
        raw[section] = {k: draw(values) for k in chosen}
        if section == "method" and draw(st.booleans()):
            raw[section]["name"] = draw(st.sampled_from(METHOD_NAMES))
    if draw(st.integers(0, 5)) == 0:
        raw[draw(st.text(max_size=8))] = draw(values)
    if draw(st.integers(0, 5)) == 0:
        raw["name"] = draw(values)
    return raw


def _loads_or_user_error(spec, overrides=()) -> None:
    try:
        recipe = load_recipe(spec, overrides)
    except UserError as e:
        assert str(e).strip(), "empty error message"
        return
    json.dumps(recipe.to_dict())  # what RunDir writes: a valid recipe is serialisable


@FUZZ
@given(raw=recipe_dicts())
def test_fuzz_recipe_dicts(raw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _loads_or_user_error(raw)
    assert list(tmp_path.iterdir()) == []


@FUZZ
@given(raw=recipe_dicts(), overrides=st.lists(
    st.tuples(st.sampled_from(["train.lr", "train.batch_size", "method.name", "method.rho", "data.max_length", "x",
                               "train", "model.name.x", "output.dir"]),
              st.text(alphabet=string.printable, max_size=10)).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=3))
def test_fuzz_recipe_overrides(raw, overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _loads_or_user_error(raw, overrides)
    assert list(tmp_path.iterdir()) == []


yaml_text = st.one_of(
    st.text(alphabet=string.printable, max_size=120),
    recipe_dicts().map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.lists(st.sampled_from(["train:", "  lr: 1e-3", "  lr: [1", "method: {name: pafi, rho: 2}", "- a", "data:",
                              "  max_length: 2024-02-30", "  task: sst2", "? [a, b]\n: c", "&a [*a]", "!!python/object:os.system x",
                              "model: !!binary aGVsbG8=", "\t", "name: ../x", "output: {dir: /tmp/x}"]),
             max_size=6).map("\n".join),
)


@FUZZ
@given(text=yaml_text)
def test_fuzz_recipe_yaml_text(text, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    _loads_or_user_error(str(path))
    assert list(work.iterdir()) == []


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=2), st.dictionaries(st.text(max_size=5), inner, max_size=2)),
    max_leaves=4)


@st.composite
def jsonl_lines(draw):
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(draw(st.text(max_size=20)))  # not JSON at all
        elif kind == 1:
            lines.append(json.dumps(draw(json_values)))
        else:
            row = {}
            for key in draw(st.lists(st.sampled_from(["sentence", "sentence1", "sentence2", "label", "idx", "text"]),
                                     max_size=4, unique=True)):
                row[key] = draw(st.one_of(st.text(max_size=10), json_values,
                                          st.sampled_from([0, 1, 2, -1, 0.5, 1.0, 5.0, "1", "nan", True])))
            lines.append(json.dumps(row))
    return "\n".join(lines)


@FUZZ
@given(task=st.sampled_from(["sst2", "mrpc", "stsb", "mnli"]), content=jsonl_lines(),
       limit=st.one_of(st.none(), st.integers(1, 5)))
def test_fuzz_glue_jsonl(task, content, limit, tmp_path):
    (tmp_path / task).mkdir(exist_ok=True)
    (tmp_path / task / "train.jsonl").write_text(content)
    try:
        rows = load_rows(task, "train", str(tmp_path), limit)
    except UserError as e:
        assert str(e).strip()
        return
    assert rows and all(isinstance(r["label"], (int, float)) for r in rows)


@FUZZ
@given(content=st.binary(max_size=200), suffix=st.sampled_from(["jsonl", "tsv", "parquet"]))
def test_fuzz_glue_raw_bytes(content, suffix, tmp_path):
    for old in tmp_path.glob("sst2/*"):
        old.unlink()
    (tmp_path / "sst2").mkdir(exist_ok=True)
    (tmp_path / "sst2" / f"train.{suffix}").write_bytes(content)
    try:
        load_rows("sst2", "train", str(tmp_path))
    except UserError:
        pass
