"""Option dataclasses whose field help texts become the docs, the schema and --help.

Every option of a recipe section (and of every method) is a dataclass field declared with
:func:`option`, which keeps the default and a one-line help text together.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory=None):
    """A dataclass field with a help text. Use ``factory`` for mutable defaults (lists, dicts)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def describe(cls) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each field of an options dataclass, in declaration order."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((f.name, type_name, default, f.metadata.get("help", "")))
    return rows
