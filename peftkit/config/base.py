"""The base of every typed option section: recipe sections, method options and bench settings.

A section is a pydantic model that forbids unknown keys, rejects NaN and infinity, and declares each
option's default, help text and allowed range in one place (:func:`option`). Converting pydantic's
errors into peftkit's one-line-per-key messages happens here too, so every kind of recipe, every
method and every bench reports a bad value the same way.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from peftkit.errors import did_you_mean

# Names users bring from other tools (HF Trainer and example scripts, peft) -> our option names.
SYNONYMS = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum", "warmup": "warmup_ratio",
    "lr_scheduler_type": "schedule", "scheduler": "schedule", "max_norm": "max_grad_norm", "output_dir": "dir",
    "lora_alpha": "alpha", "lora_r": "r", "rank": "r", "lora_dropout": "dropout", "target_modules": "targets",
    "model_name": "name", "model_name_or_path": "name", "max_seq_length": "max_length", "seq_len": "max_length",
    "per_device_eval_batch_size": "eval_batch_size", "save_total_limit": "keep_last", "eval_steps": "eval_every",
    "save_steps": "save_every", "logging_steps": "log_every", "adam_epsilon": "adam_eps",
}

# Bounds shared by many options: large enough for any real run, small enough that torch never overflows.
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**32 - 1


def option(default: Any = ..., help: str = "", *, factory=None, **constraints) -> Any:
    """A field with its default, a one-line help text (the docs) and its range (``ge``, ``gt``, ``le``, ...)."""
    if factory is not None:
        return Field(default_factory=factory, description=help, **constraints)
    return Field(default, description=help, **constraints)


class Section(BaseModel):
    """Options of one recipe section (or one method, or one bench): typed, ranged, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True, validate_default=False,
                              frozen=False, protected_namespaces=())

    @classmethod
    def options(cls) -> list[tuple[str, str, Any, str, str]]:
        """(name, type, default, range, help) of every option, in declaration order: the documentation."""
        rows = []
        for name, field in cls.model_fields.items():
            default = field.get_default(call_default_factory=True)
            rows.append((name, type_name(field.annotation), default, range_text(field), field.description or ""))
        return rows


def type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    return text or str(annotation).replace("typing.", "").replace("NoneType", "None")


def range_text(field) -> str:
    """'>= 1', '(0, 1)', ... from the field's constraints, for the docs and error messages."""
    parts = []
    for meta in _constraints(field.metadata, field.annotation):
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "len >="),
                             ("max_length", "len <=")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long"}
TYPE_WORDS = {"int_parsing": "expected an integer", "int_from_float": "expected an integer", "int_type": "expected an integer",
              "float_parsing": "expected a number", "float_type": "expected a number", "bool_type": "expected true or false",
              "bool_parsing": "expected true or false", "string_type": "expected a string", "list_type": "expected a list",
              "dict_type": "expected a mapping of options", "model_type": "expected a mapping of options"}


def _constraints(metadata, annotation) -> list:
    """The field's own constraints plus those inside its type (Optional[Annotated[float, Gt(0)]])."""
    found = list(metadata)
    for arg in getattr(annotation, "__args__", ()) or ():
        found += list(getattr(arg, "__metadata__", ()))
        found += _constraints([], arg) if getattr(arg, "__args__", None) else []
    return found


def suggest(key: str, names) -> str:
    """' (did you mean "x"?)' using close spellings and the names other tools use for the same option."""
    candidates = {n: n for n in names}
    candidates.update({alias: target for alias, target in SYNONYMS.items() if target in candidates})
    hit = did_you_mean(key, candidates)
    if not hit:
        return ""
    return f' (did you mean "{candidates[hit.split(chr(34))[1]]}"?)'


def validate_section(cls: type[Section], raw: Any, path: str, errors: list[str]) -> Section:
    """``cls`` built from ``raw``; every problem goes to ``errors`` as 'path.key: what, got value'.

    A key with a problem keeps its default in the returned section, so that checks across sections can still run
    and report their own problems in the same message (the caller refuses the recipe when ``errors`` is not empty).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a mapping of options, got {type(raw).__name__} {raw!r}")
        raw = {}
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        errors.extend(describe_errors(e, cls, path))
        bad = {item["loc"][0] for item in e.errors() if item["loc"]}
        try:
            return cls.model_validate({k: v for k, v in raw.items() if k not in bad})
        except ValidationError:  # a rule across options (a model validator): nothing to keep
            return cls.model_construct()


def describe_errors(error: ValidationError, cls: type[Section], path: str) -> list[str]:
    out = []
    for item in error.errors(include_url=False):
        loc = ".".join(str(p) for p in item["loc"])
        where = f"{path}.{loc}" if path and loc else (path or loc)
        if item["type"] == "extra_forbidden":
            parent = _model_at(cls, item["loc"][:-1])
            names = parent.model_fields if parent is not None else []
            out.append(f"{where}: unknown option{suggest(str(item['loc'][-1]), names)}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        kind = item["type"]
        if kind in RANGE_ERRORS:
            parent = _model_at(cls, item["loc"][:-1])
            field = parent.model_fields.get(item["loc"][-1]) if parent is not None else None
            allowed = range_text(field) if field is not None else ""
            message = f"must be {allowed.replace(', ', ' and ')}" if allowed else message
        elif kind in TYPE_WORDS:
            message = TYPE_WORDS[kind]
        elif kind == "literal_error":
            choices = item.get("ctx", {}).get("expected", "")
            message = f"must be one of {choices}{did_you_mean(item['input'], _literal_choices(choices))}"
        elif kind == "finite_number":
            message = "must be a finite number"
        if not item["loc"]:  # a rule across options names its own key: "symmetric: ..."
            out.append(f"{path}.{message}" if path else message)
            continue
        out.append(f"{where}: {message[0].lower() + message[1:]}, got {item['input']!r}")
    return out


def _model_at(cls, loc) -> type[Section] | None:
    model = cls
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return model if isinstance(part, int) else None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _literal_choices(text: str) -> list[str]:
    return [c.strip().strip("'\"") for c in text.replace(" or ", ", ").split(",") if c.strip()]


class BenchSettings(Section):
    """Settings of one bench (``--set key=value``). Every field defaults to None: the bench's quick or full value.
    A comma-separated string is accepted where a list is expected (``--set tasks=sst2,rte``)."""

    @model_validator(mode="before")
    @classmethod
    def _split_lists(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        out = dict(raw)
        for key, value in raw.items():
            field = cls.model_fields.get(key)
            if field is not None and isinstance(value, str) and "list" in str(field.annotation):
                out[key] = [part.strip() for part in value.split(",") if part.strip()]
        return out

    def given(self) -> dict[str, Any]:
        """Only the settings the user gave (the bench fills in the rest from its quick or full defaults)."""
        return self.model_dump(exclude_unset=True)
