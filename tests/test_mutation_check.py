"""scripts/mutation_check.py stays runnable: its mutants apply to the current source and name tests that exist.
(No mutant is run here: that is the script's job, minutes long.)"""

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def test_mutants_are_many_unique_and_apply_exactly_once_to_the_current_source():
    script = _script()
    ids = [m.id for m in script.MUTANTS]
    assert len(ids) >= 45 and len(set(ids)) == len(ids)
    assert all(m.description and m.killers for m in script.MUTANTS)
    assert script.validate(script.MUTANTS) == {}


def test_a_snippet_that_does_not_occur_exactly_once_is_reported(tmp_path):
    script = _script()
    (tmp_path / "m.py").write_text("a = 1\na = 1\n")
    twice = script.Mutant("twice", "m.py", "a = 1", "a = 2", "d", ("tests/x.py::t",))
    missing = script.Mutant("missing", "m.py", "b = 1", "b = 2", "d", ("tests/x.py::t",))
    problems = script.validate([twice, missing], tmp_path)
    assert "2 times" in problems["twice"] and "0 times" in problems["missing"]


def test_every_killer_names_an_existing_test_function():
    for m in _script().MUTANTS:
        for node in m.killers:
            path, _, name = node.partition("::")
            source = (ROOT / path).read_text()
            assert re.search(rf"^def {re.escape(name.split('[')[0])}\(", source, re.M), (m.id, node)
