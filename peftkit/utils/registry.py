"""One registry type for every kind of plugin: methods, tasks, benches and quantizers.

A plugin registers itself beside its code with a decorator (``@METHODS.register("pafi")``). The
registry is lazy: it reads the registrations from the package's source (no import) and imports only
the module of a name that is looked up, whose decorator then registers the plugin itself. The package is named as a string, so
this module (at the bottom of the import layers) never imports a plugin statically; the lookup is
the one place where a lower layer reaches plugins, the way entry points do in other tools.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from peftkit.errors import UserError, did_you_mean


@dataclass(frozen=True)
class Entry:
    name: str
    target: Any
    help: str
    module: str


class Registry:
    """Name -> plugin, with did-you-mean errors. ``package``'s modules are imported on first use."""

    def __init__(self, kind: str, package: str, hint: str):
        self.kind, self.package, self.hint = kind, package, hint
        self._entries: dict[str, Entry] = {}
        self._found: dict[str, tuple[str, str]] = {}
        self._loaded = False

    def register(self, *names: str, help: str = "") -> Callable:
        """Decorator: register the decorated class or function under ``names`` (the first is the canonical one)."""

        def decorate(target):
            for name in names:
                if name in self._entries and self._entries[name].target is not target:
                    raise RuntimeError(f"{self.kind} {name!r} is registered twice "
                                       f"({self._entries[name].module} and {target.__module__})")
                self._entries[name] = Entry(name, target, help or _first_line(target.__doc__), target.__module__)
            return target

        return decorate

    def _index(self) -> dict[str, tuple[str, str]]:
        """name -> (module, help) of every registration in the package, read from the source without importing it:
        a lookup then imports just the module that holds the name (a LoRA recipe never waits for torch). A
        registration whose names are not written out (``*NAMES``) has its module imported to learn them."""
        if self._loaded:
            return self._found
        import ast

        package = importlib.import_module(self.package)
        found: dict[str, tuple[str, str]] = {}
        variable = {"method": "METHODS", "task": "TASKS", "bench": "BENCHES", "quantizer": "QUANTIZERS"}[self.kind]
        # sorted: the file system's listing order differs between machines, and listings and docs must not
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda info: info.name):
            if info.name.startswith("_"):
                continue
            module = f"{self.package}.{info.name}"
            source = Path(package.__path__[0], f"{info.name}.py")
            tree = ast.parse(source.read_text(encoding="utf-8")) if source.is_file() else ast.Module(body=[])
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "register" and getattr(node.func.value, "id", None) == variable):
                    continue
                help_text = next((k.value.value for k in node.keywords
                                  if k.arg == "help" and isinstance(k.value, ast.Constant)), "")
                if all(isinstance(a, ast.Constant) for a in node.args):
                    found.update({a.value: (module, help_text) for a in node.args})
                else:
                    importlib.import_module(module)
                    found.update({e.name: (module, e.help) for e in self._entries.values() if e.module == module})
        self._found, self._loaded = found, True
        return found

    def names(self) -> list[str]:
        return list(self._index())

    def entries(self) -> Iterator[Entry]:
        """Every plugin, imported (for listings that read the plugins' own attributes)."""
        for name in self._index():
            yield self.entry(name)

    def __contains__(self, name: str) -> bool:
        return name in self._index()

    def help(self, name: str) -> str:
        return self._index()[name][1] if name in self._index() else ""

    def unknown(self, name: str) -> str | None:
        """Why ``name`` is no registered plugin (with the closest name and the known ones), or None when it is one."""
        index = self._index()
        if name in index:
            return None
        return f'unknown {self.kind} "{name}"{did_you_mean(name, index)}; known: {", ".join(index)}'

    def entry(self, name: str) -> Entry:
        index = self._index()
        problem = self.unknown(name)
        if problem:
            raise UserError(f"{problem}. {self.hint}")
        if name not in self._entries:
            importlib.import_module(index[name][0])
        return self._entries[name]

    def get(self, name: str) -> Any:
        return self.entry(name).target


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0]


METHODS = Registry("method", "peftkit.methods", "Run `peftkit methods` for the list.")
TASKS = Registry("task", "peftkit.tasks", "Set data.task to one of them (peftkit recipes show NAME lists the options).")
BENCHES = Registry("bench", "peftkit.bench", "Run `peftkit bench list` for the list.")
QUANTIZERS = Registry("quantizer", "peftkit.quant.quantizers", "Set quant.method to one of them (docs/quantization.md).")
