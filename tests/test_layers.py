"""The import layers: a module imports only from its own layer or the layers below it; methods and tasks, two
plugin kinds on one layer, never import each other; and no two files import each other, directly or round a
longer circle. Read from the source (AST), so imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "peftkit"
# Highest first (docs/architecture.md). A package of peftkit belongs to exactly one layer; plugins are found through
# the registry. __init__ is peftkit's own package module: peftkit.load() forwards to the artifacts layer by name.
LAYERS = [
    ("cli", {"cli", "__main__"}),
    ("commands", {"commands"}),
    ("bench/report", {"bench", "report"}),
    ("artifacts", {"artifacts"}),
    ("train", {"train"}),
    ("methods | tasks", {"methods", "tasks"}),
    ("quant/pretrain", {"quant", "pretrain"}),
    ("models", {"models"}),
    ("config", {"config"}),
    ("registry/paths/utils/errors", {"registry", "paths", "utils", "errors", "__init__"}),
]
RANK = {member: len(LAYERS) - i for i, (_, members) in enumerate(LAYERS) for member in members}
# Packages on one layer that may not import each other in either direction.
SIBLINGS = [("methods", "tasks")]


def module_name(path: Path) -> str:
    """peftkit.x.y of a file; a package's __init__.py is the package itself (what ``import peftkit.x`` loads)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("peftkit", *parts))


def part_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def imports_of(path: Path, module_level_only: bool = False) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            found.append((node.lineno, target))
            # `from peftkit.x import y` may name a module y: count it as importing peftkit.x.y as well
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names if _is_module(f"{target}.{a.name}")]
    return [(line, name) for line, name in found if name == "peftkit" or name.startswith("peftkit.")]


def _is_module(name: str) -> bool:
    path = ROOT.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_every_package_is_in_a_layer():
    unknown = sorted({part_of(module_name(p)) for p in sources()} - set(RANK))
    assert not unknown, f"packages of peftkit in no layer: {unknown}; add them to LAYERS (and docs/architecture.md)"


def upward_imports() -> list[str]:
    problems = []
    for path in sources():
        me = module_name(path)
        for line, target in imports_of(path):
            if target == "peftkit":
                continue
            if RANK.get(part_of(target), 0) > RANK[part_of(me)]:
                problems.append(f"{path.relative_to(ROOT.parent)}:{line} ({part_of(me)}) imports {target} ({part_of(target)})")
    return problems


def test_imports_only_go_down():
    problems = upward_imports()
    layers = " -> ".join(name for name, _ in LAYERS)
    assert not problems, f"imports that point up the layers ({layers}):\n" + "\n".join(problems)


def sibling_imports() -> list[str]:
    problems = []
    for path in sources():
        me = part_of(module_name(path))
        for line, target in imports_of(path):
            if any({me, part_of(target)} == {a, b} for a, b in SIBLINGS):
                problems.append(f"{path.relative_to(ROOT.parent)}:{line} ({me}) imports {target} ({part_of(target)})")
    return problems


def test_methods_and_tasks_never_import_each_other():
    problems = sibling_imports()
    assert not problems, ("methods and tasks are siblings: what both need lives below them (config, models), what "
                          "joins them above them (train, artifacts, commands):\n" + "\n".join(problems))


def import_graph(module_level_only: bool = False) -> dict[str, set[str]]:
    """module -> the peftkit modules it imports (itself left out)."""
    graph = {module_name(p): {t for _, t in imports_of(p, module_level_only)} for p in sources()}
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that reach each other through imports (strongly connected, more than one module),
    each as one circle through its members: [a, b, ..., a]."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(root):  # Tarjan's algorithm, iterative: no recursion limit on a long chain
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            nxt = next(targets, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [_circle_through(group, graph) for group in groups]


def _circle_through(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """One import path from the group's first module back to itself, inside the group (breadth first)."""
    start = min(group)
    trails, seen = [[start]], {start}
    while trails:
        trail = trails.pop(0)
        for nxt in sorted(graph[trail[-1]] & group):
            if nxt == start:
                return trail + [start]
            if nxt not in seen:
                seen.add(nxt)
                trails.append(trail + [nxt])
    raise AssertionError(f"no circle through {sorted(group)}")


def test_no_import_circle_between_files():
    """Imports inside functions included: a circle that only closes at call time still ties the files together
    (neither can move or be tested without the other), and is one edit away from an import-time failure."""
    found = circles(import_graph())
    assert not found, "files importing each other (round a circle): " + "; ".join(" -> ".join(c) for c in found)


def test_no_import_cycle_at_import_time():
    found = circles(import_graph(module_level_only=True))
    assert not found, "modules importing each other at import time: " + "; ".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("source, target, upward", [("bench", "cli", True), ("config", "methods", True),
                                                    ("train", "artifacts", True), ("artifacts", "tasks", False),
                                                    ("train", "models", False), ("paths", "config", True)])
def test_the_rule_itself(source, target, upward):
    assert (RANK[target] > RANK[source]) is upward


def test_the_circle_finder_itself():
    """A circle through a function-level import, a three-file circle and a chain without one."""
    assert circles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert imports_of(ROOT / "artifacts" / "export.py")  # reads imports at all (inside functions too)
    assert any(t == "peftkit.tasks.glue" for _, t in imports_of(ROOT / "artifacts" / "export.py"))


def test_siblings_are_one_layer():
    for a, b in SIBLINGS:
        assert RANK[a] == RANK[b]
