"""RAIN's check set (principles/checks/rain.yaml): prompts where plain sampling tends to break a
principle, and the rules that decide a violation without a model.

A check has a prompt, one principle (with a negative definition, so the contrastive scorer can value
it) and optionally a rule: ``absent`` (a regex, case-insensitive, that must not match),
``max_sentences`` and ``max_words``. :func:`rule_violations` says which parts of a rule a text breaks.
The run that compares plain sampling with RAIN on it is ``python -m benchmarks.rain``.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from principles.schema import Principle
from salmon.config import format_validation_error
from salmon.errors import UserError

DEFAULT_RAIN_CHECKS = Path(str(resources.files("principles"))) / "checks" / "rain.yaml"
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


class RainRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    absent: str | None = Field(default=None, description="A regex (case-insensitive) the response must not match.")
    max_sentences: int | None = Field(default=None, ge=1)
    max_words: int | None = Field(default=None, ge=1)

    @field_validator("absent")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a regex: {e}") from None
        return v


class RainCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    prompt: str
    principle: Principle
    rule: RainRule | None = None


def count_sentences(text: str) -> int:
    """Sentences of ``text``: pieces ending in . ! or ? (or the text's end) that hold a letter or digit."""
    pieces = SENTENCE_END.split(text.strip())
    return sum(1 for p in pieces if re.search(r"\w", p))


def rule_violations(rule: RainRule | None, text: str) -> list[str]:
    """What ``text`` breaks of ``rule`` (empty: nothing, or no rule)."""
    if rule is None:
        return []
    out = []
    if rule.absent is not None and (m := re.search(rule.absent, text, re.IGNORECASE)):
        out.append(f"matches {m.group(0)!r}")
    if rule.max_sentences is not None and (n := count_sentences(text)) > rule.max_sentences:
        out.append(f"{n} sentences")
    if rule.max_words is not None and (n := len(text.split())) > rule.max_words:
        out.append(f"{n} words")
    return out


def load_rain_checks(path: str | Path = DEFAULT_RAIN_CHECKS, limit: int | None = None) -> list[RainCheck]:
    """The checks of ``path``; a bad file is a UserError naming the check and field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the RAIN check set: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("checks"), list) or not data["checks"]:
        raise UserError(f"{path}: expected a mapping with a non-empty list 'checks'")
    out = []
    for i, raw in enumerate(data["checks"]):
        try:
            out.append(RainCheck.model_validate(raw))
        except ValidationError as e:
            raise UserError(format_validation_error(e, f"{path}: checks[{i}]")) from None
    ids = [c.id for c in out]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: check ids must be unique")
    return out[:limit] if limit else out
