"""The import layers: a module imports only from its own layer or the layers below it, and no two modules
import each other at import time. Read from the source (AST), so imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "peftkit"
# Highest first. A package of peftkit belongs to exactly one layer; plugins are found through the registry.
LAYERS = [
    ("cli", {"cli", "__main__"}),
    ("commands", {"commands"}),
    ("bench/report", {"bench", "report"}),
    ("train", {"train"}),
    ("methods/tasks", {"methods", "tasks"}),
    ("quant/pretrain", {"quant", "pretrain"}),
    ("models", {"models"}),
    ("config", {"config"}),
    ("utils/errors", {"utils", "errors", "__init__"}),
]
RANK = {member: len(LAYERS) - i for i, (_, members) in enumerate(LAYERS) for member in members}


def module_name(path: Path) -> str:
    return ".".join(("peftkit", *path.relative_to(ROOT).with_suffix("").parts))


def part_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def imports_of(path: Path, module_level_only: bool = False) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).split(".")[:-1] if path.name != "__init__.py" else module_name(path).split(".")
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
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names if (ROOT.parent / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py").exists()]
    return [(line, name) for line, name in found if name == "peftkit" or name.startswith("peftkit.")]


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


def test_no_import_cycle_at_import_time():
    graph = {module_name(p): {t for _, t in imports_of(p, module_level_only=True)} for p in sources()}
    modules = set(graph)
    graph = {m: {t for t in targets if t in modules and t != m} for m, targets in graph.items()}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for c in (cycle_from(m) for m in sorted(graph)) if c]
    assert not cycles, "modules importing each other at import time: " + "; ".join(" -> ".join(c) for c in cycles[:3])


@pytest.mark.parametrize("source, target, upward", [("bench", "cli", True), ("config", "methods", True),
                                                    ("methods", "tasks", False), ("train", "models", False)])
def test_the_rule_itself(source, target, upward):
    assert (RANK[target] > RANK[source]) is upward
