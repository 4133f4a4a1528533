"""Principle sets: the one loader and the one identity (content hash).

A set is YAML, one set a file::

    name: concise
    description: Short, direct answers.
    principles:
      - name: concise
        definition: The response answers directly, without padding or repetition.
        negative_definition: The response is padded, repetitive and slow to get to the point.
        weight: 1
        tags: [general]

A set's identity is ``sha256`` of its canonical JSON (sorted keys, defaults filled in), so two
files that say the same thing in different YAML layouts have the same hash; requests and logs
refer to a set as ``name@hash`` (the first 12 hex digits).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from functools import cached_property
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from salmon.config import format_validation_error, yaml_error_line
from salmon.errors import UserError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_DEFINITION_CHARS = 2000
MAX_PRINCIPLES = 64
HASH_LEN = 12


class PrincipleSetError(UserError):
    """A principle set that does not validate; the message names the file, the field and the fix."""


def _check_name(v: str) -> str:
    if not NAME_RE.match(v):
        raise ValueError("use 1-64 letters, digits, '_', '.', '-' (starting with a letter or digit)")
    return v


class Principle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Short identifier, e.g. 'concise'. Letters, digits, _ . - ; ≤ 64 chars.")
    definition: str = Field(description="What a response that follows the principle does.")
    negative_definition: str | None = Field(
        default=None,
        description="What a response that violates it does. Used when the principle is negated; "
        "a principle without one cannot be negated (see rm_core.render).",
    )
    weight: float = Field(default=1.0, ge=0, description="Sampling weight for RL-time principle selection.")
    tags: tuple[str, ...] = Field(default=(), description="e.g. general, reasoning, redteam.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("definition", "negative_definition")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        if len(v) > MAX_DEFINITION_CHARS:
            raise ValueError(f"is {len(v)} characters; keep it under {MAX_DEFINITION_CHARS}")
        return v


class RubricScale(BaseModel):
    """A rating scale for rubric scoring: its ends and what the response does at anchored ratings.

    The anchors speak of "the principle" and apply to each principle of the set in turn, e.g.
    ``{scale: [1, 10], anchors: {1: "The response ignores the principle.", 10: "... follows it fully."}}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: tuple[int, int] = Field(description="Lowest and highest rating, e.g. [1, 10] (I-SHEEP) or [1, 6] (DNO).")
    anchors: dict[int, str] = Field(description="Rating -> what a response at that rating does; the two ends "
                                    "at least.")

    @model_validator(mode="after")
    def _anchored(self) -> RubricScale:
        lo, hi = self.scale
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"scale: [{lo}, {hi}] must be two ratings 0 <= low < high <= 100, e.g. [1, 10]")
        outside = sorted(k for k in self.anchors if not lo <= k <= hi)
        if outside:
            raise ValueError(f"anchors: ratings {outside} are outside the scale [{lo}, {hi}]")
        if lo not in self.anchors or hi not in self.anchors:
            raise ValueError(f"anchors: give an anchor for both ends of the scale ({lo} and {hi})")
        for k, text in self.anchors.items():
            if not text.strip():
                raise ValueError(f"anchors: the text of rating {k} is empty")
            if len(text) > MAX_DEFINITION_CHARS:
                raise ValueError(f"anchors: the text of rating {k} is {len(text)} characters; keep it under "
                                 f"{MAX_DEFINITION_CHARS}")
        return self

    def levels(self) -> list[int]:
        return sorted(self.anchors)


class PrincipleSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    principles: tuple[Principle, ...]
    rubric: RubricScale | None = Field(default=None, description="Optional: the rating scale and its anchors "
                                       "for rubric scoring (POST /v1/score with mode rubric).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @model_validator(mode="after")
    def _unique(self) -> PrincipleSet:
        if not self.principles:
            raise ValueError("principles: a set needs at least one principle")
        if len(self.principles) > MAX_PRINCIPLES:
            raise ValueError(f"principles: {len(self.principles)} given; at most {MAX_PRINCIPLES}")
        seen: set[str] = set()
        for p in self.principles:
            if p.name in seen:
                raise ValueError(f"principles: name {p.name!r} appears twice; names must be unique in a set")
            seen.add(p.name)
        return self

    def canonical(self) -> dict:
        out = self.model_dump(mode="json")
        if out.get("rubric") is None:
            out.pop("rubric", None)  # a set without a rubric keeps the hash it had before rubrics existed
        return out

    @cached_property
    def hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:HASH_LEN]

    @property
    def ref(self) -> str:
        """``name@hash``: how requests, responses and logs name this exact content."""
        return f"{self.name}@{self.hash}"

    def get(self, name: str) -> Principle:
        for p in self.principles:
            if p.name == name:
                return p
        raise KeyError(name)

    def names(self) -> list[str]:
        return [p.name for p in self.principles]

    def subset(self, names: Iterable[str], name: str | None = None) -> PrincipleSet:
        wanted = list(names)
        return PrincipleSet(
            name=name or self.name,
            description=self.description,
            principles=tuple(self.get(n) for n in wanted),
            rubric=self.rubric,
        )


def parse_principle_set(data: object, where: str = "principle set") -> PrincipleSet:
    """Validate already-parsed YAML/JSON; errors name ``where``, the field and the fix."""
    if not isinstance(data, dict):
        raise PrincipleSetError(
            f"{where}: expected a mapping with 'name', 'description', 'principles', got {type(data).__name__}"
        )
    try:
        return PrincipleSet.model_validate(data)
    except ValidationError as e:
        raise PrincipleSetError(format_validation_error(e, where, PrincipleSet)) from None


def load_principle_set(path: str | Path) -> PrincipleSet:
    """Load one set from a YAML file, or a shipped set by bare name (e.g. ``"concise"``)."""
    p = Path(path)
    if not p.suffix and not p.exists():
        p = builtin_dir() / f"{path}.yaml"
        if not p.is_file():
            raise PrincipleSetError(
                f"no principle set named {str(path)!r}: shipped sets are {', '.join(builtin_names())}, "
                "or pass a path to a YAML file"
            )
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PrincipleSetError(f"{p}: file not found") from None
    except UnicodeDecodeError as e:
        raise PrincipleSetError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PrincipleSetError(f"{p}: {yaml_error_line(e)}") from None
    return parse_principle_set(data, where=str(p))


def builtin_dir() -> Path:
    return Path(str(resources.files("principles")))


def builtin_names() -> list[str]:
    return sorted(f.stem for f in builtin_dir().glob("*.yaml"))


def load_builtin_sets() -> dict[str, PrincipleSet]:
    return {n: load_principle_set(builtin_dir() / f"{n}.yaml") for n in builtin_names()}
