"""Request and response types of the HTTP contract (docs/contract.md). No torch, no serving logic.

Fields may be added, never renamed: trainers and OpenRLHF-style clients depend on these shapes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator


def _valid_unicode(v: str) -> str:
    # JSON lets "\ud800" through as a lone surrogate: not text, and it breaks hashing and tokenizers later.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains an unpaired surrogate (\\u{ord(v[e.start]):04x} at character {e.start}); "
                         "send valid Unicode text") from None
    return v


Text = Annotated[str, AfterValidator(_valid_unicode)]
"Every string a client sends: valid Unicode (checked once here, so no later stage meets a surrogate)."


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text


class ScoreItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text | list[ChatMessage] = Field(description="The instruction: a string or chat messages ending with a user turn.")
    response: Text = Field(description="The response to score.")


class InlinePrinciple(BaseModel):
    """A principle sent with the request: a bare string is its definition."""

    model_config = ConfigDict(extra="forbid")

    name: Text
    definition: Text
    negative_definition: Text | None = None


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ScoreItem] = Field(min_length=1, description="One score comes back per item, in order.")
    principle_set: Text | None = Field(
        default=None, description="A registered set: 'name' (its current content) or 'name@hash' (exact content).")
    principles: list[Text | InlinePrinciple] | None = Field(
        default=None, description="Inline principles; win over principle_set. A string is a definition.")
    negate: list[Text] = Field(default_factory=list, description="Names of principles to negate (negative definitions).")
    truncate: bool = Field(default=True, description="Truncate over-long prompts from the start; false → 422.")

    @field_validator("principles")
    @classmethod
    def _nonempty(cls, v):
        if v is not None and not v:
            raise ValueError("give at least one principle, or leave 'principles' out to use a set")
        return v


class Usage(BaseModel):
    tokens: int = Field(description="Tokens the model processed for this request, cached ones included.")
    cached_tokens: int = Field(default=0, description="Of those, tokens served from the prefix cache.")


class ScoreResponse(BaseModel):
    scores: list[float]
    model_version: str = Field(description="The scorer version that produced these scores.")
    scorer: str
    principle_set_hash: str
    principle_set: str | None = Field(default=None, description="name@hash of the set used (inline: 'inline@hash').")
    truncated: list[int] = Field(default_factory=list, description="Indices of items whose prompt was truncated.")
    usage: Usage


class RewardRequest(BaseModel):
    """OpenRLHF's remote reward-model protocol."""

    model_config = ConfigDict(extra="allow")

    query: list[Text] = Field(min_length=1, description="Full chat-templated prompt+response texts.")
    prompts: list[Text] | None = Field(default=None, description="The prompt part of each query, if known.")
    labels: list[Any] | None = None


class RewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, Any] = Field(default_factory=dict)


class PrincipleSetInfo(BaseModel):
    name: str
    hash: str
    ref: str
    description: str = ""
    num_principles: int
    is_default: bool = False


class PrincipleSetList(BaseModel):
    principle_sets: list[PrincipleSetInfo]
    default: str


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Text | None = Field(default=None, description="Registry version to serve; default: CURRENT.")


class ReloadResponse(BaseModel):
    reloaded: bool
    model_version: str
    previous_version: str
    message: str


class ModelInfo(BaseModel):
    scorer: str
    model_version: str
    base_model: str
    registry: str | None
    prompt_format_version: str
    default_principle_set: str
    limits: dict[str, int | float]
    prefix_cache: dict[str, Any]
    last_reload_error: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail
