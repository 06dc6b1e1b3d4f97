"""`peftkit recipes list / show`: the shipped recipes, and one recipe resolved with every option's doc."""

from __future__ import annotations


def list_recipes() -> str:
    from peftkit.config.loader import configs_dir, infer_kind, read_yaml
    from peftkit.errors import UserError

    def field(raw, section, key):
        value = raw.get(section)
        return str(value.get(key, "")) if isinstance(value, dict) else ""

    lines = []
    for path in sorted(configs_dir().glob("*.yaml")):
        try:
            raw = read_yaml(path)
        except UserError:
            raw = {}
        kind = raw.get("kind") or infer_kind(raw)
        # finetune recipes name a method, quantize recipes a quant.method, pretrain recipes an mlm.variant
        method = field(raw, "method", "name") or field(raw, "quant", "method") or field(raw, "mlm", "variant") or "?"
        model = field(raw, "model", "name") or field(raw, "model", "preset") or "?"
        task = field(raw, "data", "task") or (f"{field(raw, 'quant', 'bits')}-bit" if "quant" in raw else "")
        lines.append(f"{path.stem:36s} {kind:9s} {method:10s} {model:14s} {task}")
    return "\n".join(lines)


def show_recipe(name: str, overrides: list[str]) -> str:
    """The resolved recipe as YAML, each option followed by its type, range and help as a comment."""
    from peftkit.config.loader import load_recipe
    from peftkit.utils.registry import METHODS

    recipe = load_recipe(name, overrides)
    lines = [f"# {recipe.source}", f"kind: {recipe.kind}"]
    for section in recipe.SECTIONS:
        value = getattr(recipe, section)
        lines.append(f"{section}:")
        if section == "method":
            lines.append(f"  name: {recipe.method_name}  # {METHODS.entry(recipe.method_name).help}")
        for option, type_name, _default, allowed, help_text in type(value).options():
            current = getattr(value, option)
            doc = "; ".join(x for x in (type_name, allowed, help_text) if x)
            lines.append(f"  {option}: {_yaml_scalar(current)}  # {doc}")
    return "\n".join(lines)


def _yaml_scalar(value) -> str:
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)
