"""One registry type for every kind of plugin: methods, tasks and benches.

A plugin registers itself beside its code with a decorator (``@METHODS.register("pafi")``). The
registry is lazy: nothing is imported until a name is looked up or listed; then the modules of the
plugin package are imported once, which runs their decorators. The package is named as a string, so
this module (at the bottom of the import layers) never imports a plugin statically; the lookup is
the one place where a lower layer reaches plugins, the way entry points do in other tools.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
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

    def _load(self) -> None:
        if self._loaded:
            return
        package = importlib.import_module(self.package)
        # sorted: the file system's listing order differs between machines, and listings and docs must not
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda info: info.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")
        self._loaded = True

    def _ordered(self) -> list[Entry]:
        """By module name, then in the order a module registers them: the same on every machine, whichever
        plugin module happened to be imported first."""
        self._load()
        position = {name: i for i, name in enumerate(self._entries)}
        return sorted(self._entries.values(), key=lambda e: (e.module, position[e.name]))

    def names(self) -> list[str]:
        return [entry.name for entry in self._ordered()]

    def entries(self) -> Iterator[Entry]:
        seen = set()
        for entry in self._ordered():
            if (entry.name, id(entry.target)) not in seen:
                seen.add((entry.name, id(entry.target)))
                yield entry

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def entry(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            raise UserError(f'unknown {self.kind} "{name}"{did_you_mean(name, self._entries)}; '
                            f"known: {', '.join(self._entries)}. {self.hint}")
        return self._entries[name]

    def get(self, name: str) -> Any:
        return self.entry(name).target


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0]


METHODS = Registry("method", "peftkit.methods", "Run `peftkit methods` for the list.")
TASKS = Registry("task", "peftkit.tasks", "Set data.task to one of them (peftkit recipes show NAME lists the options).")
BENCHES = Registry("bench", "peftkit.bench", "Run `peftkit bench list` for the list.")
