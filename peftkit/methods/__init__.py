"""Method plugins. Each module registers its method beside its code (``@METHODS.register``); the
registry (peftkit.utils.registry) imports them only when a method is looked up."""

from __future__ import annotations

from typing import Any

from peftkit.utils.registry import METHODS


def create_method(name: str, options: Any = None, **values):
    """The plugin registered as ``name``, bound to validated options (a MethodArgs, a dict, or keyword values)."""
    from peftkit.config.base import validate_section
    from peftkit.errors import UserError

    cls = METHODS.get(name)
    if options is None or isinstance(options, dict):
        errors: list[str] = []
        options = validate_section(cls.Options, {**(options or {}), **values}, "method", errors)
        if errors:
            raise UserError(f"invalid options for method {name!r}: {'; '.join(errors)}.")
    return cls(options)
