"""YAML config files validated by pydantic: the one loader for run, job and service configs.

Errors are one line that names the file, the field and what is wrong, e.g.
``run.yaml: field 'grpo.num_generations': Input should be greater than or equal to 2``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

from salmon.errors import UserError

M = TypeVar("M", bound=BaseModel)


def _model_at(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc`` (to list the fields allowed there)."""
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        nxt = None
        for t in (field.annotation, *get_args(field.annotation)):
            for c in (t, *get_args(t)):
                if isinstance(c, type) and issubclass(c, BaseModel):
                    nxt = c
        model = nxt
    return model


def format_validation_error(err: ValidationError, where: str, model: type[BaseModel] | None = None) -> str:
    """One line: ``where: field 'a.b': what is wrong; field 'c': …``. ``model`` lets unknown-field
    errors list the fields allowed at that place."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            msg = "is required"
        elif e["type"] == "extra_forbidden":
            owner = _model_at(model, tuple(e["loc"]))
            allowed = f"allowed: {', '.join(owner.model_fields)}" if owner else "check the spelling"
            msg = f"is not a known field ({allowed})"
        parts.append(f"field '{loc}': {msg}")
    return f"{where}: " + "; ".join(parts)


def yaml_error_line(e: yaml.YAMLError) -> str:
    """A YAML error as one line with its position (PyYAML's own text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or str(e)
    return f"invalid YAML{at}: " + " ".join(str(problem).split())


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{p}: file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{p}: {yaml_error_line(e)}") from None


def validate_config(model: type[M], data: Any, where: str) -> M:
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of fields at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, where, model)) from None


def load_config(model: type[M], path: str | Path | None, overrides: dict[str, Any] | None = None) -> M:
    """``model`` from YAML at ``path`` (or defaults when None), with top-level ``overrides`` applied."""
    data = load_yaml(path) if path else {}
    if overrides:
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return validate_config(model, data, str(path) if path else "config")
