"""Load a YAML recipe, apply dotted overrides, validate every key at once.

Validation happens before anything heavy is imported: a bad recipe fails in well under a
second with every problem listed by its key path (``train.lr: expected a number, got 'abc'``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.config.schema import SECTIONS
from peftkit.errors import UserError, did_you_mean

_NONE_WORDS = {None, "null", "none", "None", "~"}

# Names users bring from other tools (HF Trainer, peft) -> our option names, for "did you mean".
SYNONYMS = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum", "warmup": "warmup_ratio",
    "lr_scheduler_type": "schedule", "scheduler": "schedule", "max_norm": "max_grad_norm", "output_dir": "dir",
    "lora_alpha": "alpha", "lora_r": "r", "rank": "r", "lora_dropout": "dropout", "target_modules": "targets",
    "model_name": "name", "model_name_or_path": "name", "max_seq_length": "max_length", "seq_len": "max_length",
}


def suggest(key: str, names: list[str]) -> str:
    """' (did you mean "x"?)' using close spellings and the names other tools use for the same option."""
    candidates = {n: n for n in names}
    candidates.update({alias: target for alias, target in SYNONYMS.items() if target in names})
    hit = did_you_mean(key, candidates)
    if not hit:
        return ""
    matched = hit.split('"')[1]
    return f' (did you mean "{candidates[matched]}"?)'


@dataclass
class Recipe:
    """A validated recipe: typed section objects plus where it came from."""

    name: str
    source: str
    model: Any
    data: Any
    method: Any  # the method's own options dataclass instance
    method_name: str
    train: Any
    output: Any

    def to_dict(self) -> dict:
        d = {s: dataclasses.asdict(getattr(self, s)) for s in ("model", "data", "train", "output")}
        d["method"] = {"name": self.method_name, **dataclasses.asdict(self.method)}
        return d

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir or f"runs/{self.name}")


def configs_dir() -> Path:
    """The recipes shipped with the project (repo-root configs/)."""
    return Path(__file__).resolve().parents[2] / "configs"


def resolve_recipe_path(spec: str) -> Path:
    path = Path(spec)
    if path.is_file():
        return path
    for candidate in (configs_dir() / spec, configs_dir() / f"{spec}.yaml"):
        if candidate.is_file():
            return candidate
    names = [p.stem for p in configs_dir().glob("*.yaml")]
    raise UserError(
        f'recipe "{spec}" is neither a file nor a recipe name{did_you_mean(Path(spec).stem, names)}. '
        f"Give a path to a YAML file or one of the names `peftkit recipes list` prints."
    )


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read recipe {path}: {e}. Check the path and that it is a UTF-8 text file.") from None
    try:
        data = yaml.safe_load(text)
    except ValueError as e:  # a scalar YAML resolves but cannot construct, e.g. the date 2024-02-30
        raise UserError(f"recipe {path} is not valid YAML: {e}. Quote the value or fix it and run again.") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UserError(f"recipe {path} is not valid YAML{at}: {getattr(e, 'problem', e)}. Fix the syntax and run again.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of sections (model, data, method, train, output), got {type(data).__name__}.")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); values are parsed as YAML scalars."""
    import yaml

    if "=" not in text:
        raise UserError(f'override "{text}" must look like section.key=value (e.g. train.lr=3e-4).')
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError):
        value = raw
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise UserError(f'override "{text}": the key needs a section, e.g. train.lr=3e-4 or method.rho=0.005.')
    return parts, value


def set_path(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _coerce(value: Any, annotation: Any, path: str, errors: list[str]) -> Any:
    """Check ``value`` against a type annotation, converting where lossless (int -> float, '1e-3' -> float)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if (value is None or isinstance(value, str) and value in _NONE_WORDS) and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        sub_errors: list[str] = []
        out = _coerce(value, non_none[0], path, sub_errors) if len(non_none) == 1 else value
        errors.extend(sub_errors)
        return out
    if origin is typing.Literal:
        if value in args:
            return value
        errors.append(f"{path}: {value!r} is not one of {', '.join(map(str, args))}{did_you_mean(value, args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected a list, got {type(value).__name__} {value!r}")
            return value
        return [_coerce(v, args[0] if args else Any, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{path}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        errors.append(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        errors.append(f"{path}: expected a number, got {value!r}")
        return value
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):
            return str(value).lower()
        errors.append(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def build_section(cls, raw: Any, path: str, errors: list[str], skip: tuple[str, ...] = ()):
    """Instantiate options dataclass ``cls`` from a raw mapping, recording every problem in ``errors``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a mapping of options, got {type(raw).__name__} {raw!r}")
        raw = {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key in skip:
            continue
        if key not in names:
            errors.append(f"{path}.{key}: unknown option{suggest(key, names)}")
            continue
        problems: list[str] = []
        coerced = _coerce(value, hints[key], f"{path}.{key}", problems)
        errors.extend(problems)
        if not problems:  # a badly typed value keeps the default, so validate() only ever sees typed values
            kwargs[key] = coerced
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        errors.append(f"{path}: {e}")
        return cls()


def check_counts(values: dict[str, Any], errors: list[str], nullable: bool = False) -> None:
    """Record 'key: must be at least 1' for each integer option below 1 (``nullable``: None is allowed too)."""
    rule = "a positive integer or null" if nullable else "at least 1"
    for key, v in values.items():
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            errors.append(f"{key}: must be {rule}, got {v}")


def _check_values(recipe: Recipe, errors: list[str]) -> None:
    t, d = recipe.train, recipe.data
    check_counts({"train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum, "data.max_length": d.max_length,
                  "train.eval_batch_size": t.eval_batch_size, "train.log_every": t.log_every,
                  "train.keep_last": t.keep_last}, errors)
    check_counts({"train.max_steps": t.max_steps, "train.eval_every": t.eval_every, "train.save_every": t.save_every,
                  "data.limit": d.limit, "data.eval_limit": d.eval_limit}, errors, nullable=True)
    if isinstance(t.lr, float) and not t.lr > 0:
        errors.append(f"train.lr: must be positive, got {t.lr}")
    if isinstance(t.epochs, float) and not 0 < t.epochs < math.inf:
        errors.append(f"train.epochs: must be a positive finite number, got {t.epochs}")
    if isinstance(t.warmup_ratio, float) and not 0 <= t.warmup_ratio < 1:
        errors.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    for key, split in (("data.train_split", d.train_split), ("data.eval_split", d.eval_split)):
        if isinstance(split, str) and not _plain_name(split):
            errors.append(f"{key}: {split!r} must be a split name such as train or validation (no '/', '..')")
    if isinstance(t.resume, str) and t.resume not in ("auto", "false") and not _exists(t.resume):
        errors.append(f"train.resume: {t.resume!r} is neither 'auto', 'false' nor an existing checkpoint path")
    validate = getattr(recipe.method, "validate", None)
    if callable(validate):
        errors.extend(f"method.{msg}" for msg in validate())
    if isinstance(d.task, str) and isinstance(recipe.model.task_head, str):
        from peftkit.data.lm_text import task_problems

        errors.extend(task_problems(recipe))


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # e.g. a NUL byte or a name too long for the file system
        return False


def _plain_name(name: Any) -> bool:
    """A name usable as one path component: no separators, not '.' or '..'."""
    return isinstance(name, str) and bool(name.strip()) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def check_run_name(name: Any, errors: list[str]) -> None:
    """A recipe's name becomes runs/<name> when output.dir is unset: it must not climb out of runs/."""
    if not _plain_name(name):
        errors.append(f"name: {name!r} must be a plain file name (no '/', '\\', '..'); it names the default "
                      f"run directory runs/<name>. Set output.dir to choose a directory instead")


def read_recipe_sections(spec: str | Path | dict, overrides, sections, dict_name: str) -> tuple[dict, str, str, list[str]]:
    """The part every recipe loader shares: read the YAML (or take a dict), apply overrides, reject unknown
    sections and unsafe names. Returns (raw tree, source, run name, errors so far)."""
    if isinstance(spec, dict):
        raw, source, name = dict(spec), "<dict>", dict_name
    else:
        path = resolve_recipe_path(str(spec))
        raw, source, name = read_yaml(path), str(path), path.stem
    for text in overrides:
        parts, value = parse_override(text)
        set_path(raw, parts, value)
    errors: list[str] = []
    for key in raw:
        if key not in sections and key != "name":
            errors.append(f"{key}: unknown section{did_you_mean(key, sections)} (sections: {', '.join(sections)})")
    if "name" in raw:
        check_run_name(raw["name"], errors)
        if isinstance(raw["name"], str):
            name = raw["name"]
    return raw, source, name, errors


def load_recipe(spec: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe. Raises UserError listing every problem at once."""
    from peftkit.methods import METHODS, get_method

    raw, source, name, errors = read_recipe_sections(spec, overrides, SECTIONS, "recipe")
    sections = {s: build_section(cls, raw.get(s), s, errors, skip=("name",) if s == "method" else ())
                for s, cls in SECTIONS.items() if s != "method"}

    method_raw = raw.get("method") or {}
    if not isinstance(method_raw, dict):
        errors.append(f"method: expected a mapping with a 'name', got {method_raw!r}")
        method_raw = {}
    method_name = str(method_raw.get("name", "lora"))
    method_options = None
    if method_name in METHODS:
        try:
            options_cls = get_method(method_name).Options
        except UserError as e:
            errors.append(f"method.name: {e}")
        else:
            method_options = build_section(options_cls, method_raw, "method", errors, skip=("name",))
    else:
        errors.append(f"method.name: unknown method {method_name!r}{did_you_mean(method_name, METHODS)}")

    recipe = Recipe(name=name, source=source, method=method_options, method_name=method_name, **sections)
    _check_values(recipe, errors)
    if errors:
        where = f" in {source}" if source != "<dict>" else ""
        listing = "; ".join(errors)
        raise UserError(f"invalid recipe{where} ({len(errors)} problem{'s' if len(errors) > 1 else ''}): {listing}. "
                        f"Fix these keys (peftkit recipes show NAME prints every option with its default).")
    return recipe


# Recipes of other commands are recognised by a section only they have: module with a load_recipe(spec, overrides).
OTHER_RECIPE_KINDS = {"quant": "peftkit.quant.recipe", "mlm": "peftkit.pretrain.recipe"}


def load_any_recipe(spec: str, overrides: list[str] | tuple[str, ...] = ()):
    """Validate a recipe of any command (finetune, quantize, pretrain), chosen by its sections."""
    import importlib

    path = resolve_recipe_path(str(spec))
    raw = read_yaml(path)
    for section, module in OTHER_RECIPE_KINDS.items():
        if section in raw:
            return importlib.import_module(module).load_recipe(path, overrides)
    return load_recipe(path, overrides)
