"""A bench is Settings + run: what benches share lives in bench.harness, bench.costs and bench.grid (and the layers
below), never in another bench, so that changing one bench cannot move another's numbers."""

from __future__ import annotations

import ast

from test_layers import ROOT, imports_of, module_name


def bench_modules() -> dict[str, object]:
    """peftkit.bench.x -> path of every module that registers a bench (``@BENCHES.register(...)``)."""
    found = {}
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register"
                    and getattr(node.func.value, "id", None) == "BENCHES"):
                found[module_name(path)] = path
                break
    return found


def test_no_bench_imports_another_bench():
    benches = bench_modules()
    assert {"peftkit.bench.glue", "peftkit.bench.memory", "peftkit.bench.peers"} <= set(benches)
    crossings = [f"{module}:{line} imports {target}" for module, path in benches.items()
                 for line, target in imports_of(path)
                 if target != module and any(target == other or target.startswith(other + ".") for other in benches)]
    assert crossings == [], "benches share code through bench.harness / bench.costs / bench.grid: " + "; ".join(crossings)


def test_the_shared_modules_import_no_bench():
    benches = bench_modules()
    for name in ("harness", "costs", "grid"):
        path = ROOT / "bench" / f"{name}.py"
        assert module_name(path) not in benches
        assert [t for _, t in imports_of(path) if t in benches] == [], name
