"""What a finished run is: the contents of ``final/peftkit.json``, one typed object.

A fine-tuning run records its base model, its method with the method's options and its task (with what a task
needs to read new rows the way training read its own: label names, text columns, ``max_length``). Loading,
exporting, evaluating and predicting all start from this record; the record itself knows nothing of them.
The keys on disk are the ones peftkit has always written, so run directories from earlier versions load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, model_validator

from peftkit.errors import UserError

INFO_FILE = "peftkit.json"
EXPECTED = ('a JSON object with "method" (a method name), "options" (an object) and "model" (an object with '
            '"name" and "task_head"), as peftkit finetune writes it')


class RunInfo(BaseModel):
    """peftkit.json of a run. Task-specific keys (``task_type``, ``labels``, ``text_columns``, ...) are kept as
    they were written and read as attributes or with :meth:`get`."""

    model_config = ConfigDict(extra="allow")

    method: str
    options: dict[str, Any] = {}
    model: dict[str, Any]
    task: Optional[str] = None
    num_labels: Optional[int] = None
    problem_type: Optional[str] = None
    max_length: Optional[int] = None
    _order: list[str] = PrivateAttr(default_factory=list)  # the keys in the order they were given (and written)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_order(cls, data: Any, handler):
        info = handler(data)
        if isinstance(data, dict):
            info._order = list(data)
        return info

    def get(self, key: str, default: Any = None) -> Any:
        """A key of the record, task-specific ones included (``default`` when the record lacks it)."""
        return self.as_dict().get(key, default)

    def as_dict(self) -> dict[str, Any]:
        """The record as it is written to disk: only the keys it was given, in their order."""
        dumped = self.model_dump(mode="json", exclude_unset=True)
        return {**{k: dumped[k] for k in self._order if k in dumped}, **dumped}

    def write(self, directory: str | Path) -> Path:
        """peftkit.json into ``directory`` (a run's final/, being written)."""
        path = Path(directory) / INFO_FILE
        path.write_text(json.dumps(self.as_dict(), indent=2))
        return path


def read_run_info(directory: str | Path) -> RunInfo:
    """peftkit.json of a finished run (``directory`` or the file itself), checked: a method this peftkit has, its
    options and a valid model section, or one clear error naming the file."""
    from peftkit.config.schema import ModelArgs
    from peftkit.utils.registry import METHODS

    path = Path(directory)
    if path.name != INFO_FILE:
        path = path / INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e}); expected {EXPECTED}.") from None
    if not (isinstance(info, dict) and isinstance(info.get("method"), str) and isinstance(info.get("options", {}), dict)
            and isinstance(info.get("model"), dict)):
        raise UserError(f"{path} is not peftkit run metadata; expected {EXPECTED}.")
    if info["method"] not in METHODS:
        raise UserError(f"{path} names the method {info['method']!r}, which this peftkit does not have "
                        f"(known: {', '.join(METHODS.names())}).")
    try:
        ModelArgs.model_validate(info["model"])
    except ValidationError as e:
        raise UserError(f"{path}: its model section is not valid ({e.error_count()} problem(s)); expected {EXPECTED}.") from None
    info.setdefault("options", {})
    try:
        return RunInfo.model_validate(info)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise UserError(f"{path} is not peftkit run metadata ({problems}); expected {EXPECTED}.") from None
