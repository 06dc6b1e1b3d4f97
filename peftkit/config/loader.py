"""Load any recipe: read the YAML, apply dotted overrides, validate every section at once.

``load_recipe(spec, overrides, kind)`` is the one way a recipe becomes a typed object, for every kind
(finetune, pretrain, quantize) and for bench settings (``load_settings``). Every problem is listed by
its key path in one error (exit 2), with a "did you mean" for misspelled keys and for the names other
tools use (learning_rate -> lr). Checks that need a plugin's knowledge (a method's options, whether a
task fits the model head) are asked of the plugin through the registry.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from peftkit.config.base import Section, describe_errors, suggest, validate_section
from peftkit.config.schema import KINDS, MethodArgs, Recipe, plain_name
from peftkit.errors import UserError, did_you_mean
from peftkit.paths import configs_dir
from peftkit.utils.registry import METHODS
from peftkit.utils.safe_yaml import DuplicateKeyError, load_yaml_bounded

# YAML 1.1 (PyYAML) reads 1e-3 as a string: only numbers with a dot count as floats. Recipes follow YAML 1.2 here.
_FLOAT = re.compile(r"^[-+]?(?:(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+)$"
                    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")
MAX_YAML_NODES = 100_000  # a recipe has a few hundred; alias bombs expand to billions


RECIPE_GROUPS = ("glue", "lm", "quantize", "pretrain")


def shipped_recipes() -> dict[str, Path]:
    """Every shipped recipe by its name (the file's stem): names are flat across the groups, so
    `peftkit finetune lora-minilm-sst2` needs no group, and no two groups may hold the same name."""
    found: dict[str, Path] = {}
    for path in sorted(configs_dir().glob("*/*.yaml")):
        found.setdefault(path.stem, path)
    return found


def resolve_recipe_path(spec: str) -> Path:
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return path
    shipped = shipped_recipes()
    stem = spec[:-5] if spec.endswith(".yaml") else spec
    if stem in shipped:
        return shipped[stem]
    names = list(shipped)
    raise UserError(f'recipe "{spec}" is neither a file nor a recipe name{did_you_mean(Path(spec).stem, names)}. '
                    f"Give a path to a YAML file or one of the names `peftkit recipes list` prints.")


def _yaml_loader():
    """SafeLoader with YAML 1.2 floats: 1e-3 is a number, as in every other tool users write configs for."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        pass

    RecipeLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for first in "-+0123456789.":
        resolvers = [r for r in RecipeLoader.yaml_implicit_resolvers.get(first, []) if r[0] != "tag:yaml.org,2002:float"]
        RecipeLoader.yaml_implicit_resolvers[first] = [("tag:yaml.org,2002:float", _FLOAT), *resolvers]
    return RecipeLoader


def parse_yaml(text: str, where: str) -> Any:
    import yaml

    try:
        return load_yaml_bounded(text, MAX_YAML_NODES, source=where, loader_class=_yaml_loader())
    except ValueError as e:  # a scalar that resolves but cannot construct, e.g. the date 2024-02-30
        raise UserError(f"{where} is not valid YAML: {e}. Quote the value or fix it and run again.") from None
    except RecursionError:
        raise UserError(f"{where} nests too deeply to be a recipe.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{where} is not valid YAML{at}: {getattr(e, 'problem', e)}. Fix the syntax and run again.") from None


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read recipe {path}: {e}. Check the path and that it is a UTF-8 text file.") from None
    data = parse_yaml(text, f"recipe {path}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of sections (kind, model, data, method, train, output), "
                        f"got {type(data).__name__}.")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); the value is read as a YAML scalar or flow collection."""
    if "=" not in text:
        raise UserError(f'override "{text}" must look like section.key=value (e.g. train.lr=3e-4).')
    key, _, raw = text.partition("=")
    try:
        value = parse_yaml(raw, f'override "{text}"') if raw.strip() else ""
    except DuplicateKeyError:  # a flow mapping naming a key twice is no plain string either
        raise
    except UserError:
        value = raw
    if isinstance(value, str) and value in ("none", "None"):
        value = None
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f'override "{text}" has no key; write section.key=value, e.g. train.lr=3e-4.')
    return parts, value


def parsed_overrides(overrides: Iterable[str]) -> list[tuple[str, list[str], Any]]:
    """(text, key path, value) of each override, refusing a key given twice: the later one would silently win."""
    parsed, given = [], {}
    for text in overrides:
        parts, value = parse_override(text)
        key = ".".join(parts)
        if key in given:
            raise UserError(f'the key {key} is set twice, by "{given[key]}" and by "{text}"; only one value can '
                            f"hold. Give it once.")
        given[key] = text
        parsed.append((text, parts, value))
    return parsed


def apply_overrides(tree: dict, overrides: Iterable[str], need_section: bool = True) -> None:
    for text, parts, value in parsed_overrides(overrides):
        if need_section and len(parts) < 2 and parts[0] not in ("name", "kind"):
            raise UserError(f'override "{text}": the key needs a section, e.g. train.lr=3e-4 or method.rho=0.005.')
        node = tree
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value


def infer_kind(raw: dict) -> str:
    """The kind of a recipe that does not say: by the section only that kind has."""
    if "quant" in raw or "calib" in raw:
        return "quantize"
    if "mlm" in raw:
        return "pretrain"
    return "finetune"


def load_recipe(spec: str | Path | dict, overrides: Iterable[str] = (), kind: str | None = None,
                check_plugins: bool = True) -> Recipe:
    """Read, override and validate a recipe of any kind. ``kind`` is what the calling command runs; a recipe
    of another kind is refused. Raises UserError listing every problem at once."""
    if isinstance(spec, dict):
        raw, source, name = dict(spec), "<dict>", "recipe"
    else:
        path = resolve_recipe_path(str(spec))
        raw, source, name = read_yaml(path), str(path), path.stem
    apply_overrides(raw, overrides)
    errors: list[str] = []

    declared = raw.pop("kind", None)
    if declared is not None and declared not in KINDS:
        raise UserError(f"kind: {declared!r} is not a recipe kind{did_you_mean(declared, KINDS)} "
                        f"(one of {', '.join(KINDS)}).")
    recipe_kind = declared or kind or infer_kind(raw)
    if kind is not None and recipe_kind != kind:
        raise UserError(f"{source} is a {recipe_kind} recipe (kind: {recipe_kind}); run it with `peftkit {recipe_kind}`, "
                        f"or give a {kind} recipe.")
    cls = KINDS[recipe_kind]

    if "name" in raw:
        try:
            name = plain_name(str(raw.pop("name")))
        except ValueError as e:
            errors.append(f"name: {e}; it names the default run directory runs/<name>. Set output.dir instead")
    for key in raw:
        if key not in cls.SECTIONS:
            errors.append(f"{key}: unknown section for a {recipe_kind} recipe{did_you_mean(key, cls.SECTIONS)} "
                          f"(sections: kind, name, {', '.join(cls.SECTIONS)})")

    sections: dict[str, Any] = {}
    for section in cls.SECTIONS:
        if section == "method":
            sections["method_name"], sections["method"] = _method_section(raw.get("method"), errors)
            continue
        field = cls.model_fields[section]
        sections[section] = validate_section(field.annotation, raw.get(section), section, errors)

    recipe = cls.model_construct(kind=recipe_kind, name=name, source=source, **sections)
    try:
        recipe.run_dir  # '~' and $VARS expanded; '.', home, '/' and the repository refused
    except UserError as e:
        errors.append(f"output.dir: {e}")
    if check_plugins and (recipe_kind != "finetune" or recipe.method_name in METHODS):
        errors.extend(plugin_problems(recipe))
    if errors:
        where = f" in {source}" if source != "<dict>" else ""
        raise UserError(f"invalid {recipe_kind} recipe{where} ({len(errors)} problem{'s' if len(errors) > 1 else ''}): "
                        f"{'; '.join(errors)}. Fix these keys (peftkit recipes show NAME prints every option with its "
                        f"default and range).")
    return recipe


def _method_section(raw: Any, errors: list[str]):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"method: expected a mapping with a 'name', got {raw!r}")
        return "lora", MethodArgs()
    options = dict(raw)
    name = str(options.pop("name", "lora"))
    if name not in METHODS:
        errors.append(f"method.name: unknown method {name!r}{did_you_mean(name, METHODS.names())} "
                      f"(peftkit methods lists them)")
        return name, MethodArgs()
    return name, validate_section(METHODS.get(name).Options, options, "method", errors)


def plugin_problems(recipe: Recipe) -> list[str]:
    """What the recipe's task says of the rest of the recipe (head, method, data options), before any model loads."""
    from peftkit.utils.registry import TASKS

    task_name = {"finetune": lambda r: r.data.task, "pretrain": lambda r: "mlm",
                 "quantize": lambda r: "calibration"}[recipe.kind](recipe)
    known = [e.name for e in TASKS.entries() if e.target.recipe_kind == recipe.kind]
    if task_name not in known:
        return [f"data.task: unknown task {task_name!r}{did_you_mean(task_name, known)} (known: {', '.join(known)})"]
    return list(TASKS.get(task_name).recipe_problems(recipe))


def load_settings(cls: type[Section], items: Iterable[str], where: str) -> Section:
    """Bench settings from ``--set key=value`` items, validated like a recipe section (exit 2 on any problem)."""
    raw: dict = {}
    for _, parts, value in parsed_overrides(items):
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[parts[-1]] = value
    errors: list[str] = []
    settings = validate_section(cls, raw, "", errors)
    if errors:
        known = ", ".join(cls.model_fields)
        raise UserError(f"invalid {where} settings ({len(errors)} problem{'s' if len(errors) > 1 else ''}): "
                        f"{'; '.join(errors)}. Known settings: {known}.")
    return settings


__all__ = ["load_recipe", "load_settings", "read_yaml", "parse_override", "configs_dir", "shipped_recipes",
           "resolve_recipe_path",
           "describe_errors", "suggest", "Section"]
