"""Request and response types of the HTTP contract (docs/contract.md). No torch, no serving logic.

Fields may be added, never renamed: trainers and OpenRLHF-style clients depend on these shapes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from principles.schema import RubricScale

ScoreMode = Literal["pointwise", "rubric", "listwise"]


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


def _principles_given(cls, v):
    """The one check of both request types: an empty inline list is a mistake, not "no principles"."""
    if v is not None and not v:
        raise ValueError("give at least one principle, or leave 'principles' out to use a set")
    return v


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
    mode: ScoreMode | None = Field(
        default=None, description="pointwise (default): one score per item. rubric: per-principle ratings on "
        "the set's scale (its 'rubric' anchors, or this request's 'rubric'); the item's score is their mean. "
        "listwise: the items sharing a prompt are ranked together (ranks, and scores read against the "
        "other candidates). Else the X-Score-Mode header.")
    rubric: RubricScale | None = Field(
        default=None, description="The scale and anchors for mode rubric; wins over the set's own.")

    _nonempty = field_validator("principles")(_principles_given)


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
    mode: ScoreMode = Field(default="pointwise", description="The mode that produced these scores.")
    rubric: list[dict[str, float]] | None = Field(
        default=None, description="mode rubric: per item, principle name -> rating on the scale.")
    scale: tuple[int, int] | None = Field(default=None, description="mode rubric: the scale's ends.")
    ranks: list[int] | None = Field(default=None, description="mode listwise: per item, its rank in its list "
                                    "(1 = best; ties share a rank).")
    lists: list[int] | None = Field(default=None, description="mode listwise: per item, the list (one per "
                                    "distinct prompt, in order of first appearance) it was ranked in.")


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


class PoolingInput(BaseModel):
    """vLLM's pooling request (``/classify``, ``/pooling``): texts in ``input``, or one conversation in
    ``messages``. vLLM's other fields are accepted so its clients work unchanged; unknown ones are a 422."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = Field(default=None, description="Any name; echoed back. The served scorer is "
                               "whatever the service serves (its version is in model_version).")
    input: Text | list[Text] | None = Field(
        default=None, description="Whole chat-templated texts (prompt + response), as /get_reward's 'query': "
        "split into turns by the served model's chat template. Token ids are not accepted.")
    messages: list[ChatMessage] | None = Field(
        default=None, description="One conversation instead of 'input': the last message is the assistant "
        "response to score, the ones before it the prompt (ending with a user turn).")
    principle_set: Text | None = Field(
        default=None, description="salmon's field: 'name' or 'name@hash'; else the X-Principle-Set header, "
        "else the default set.")
    use_activation: bool | None = Field(default=None, description="true: sigmoid(score) instead of the raw "
                                        "score (default: raw; a reward is not a probability).")
    activation: bool | None = Field(default=None, description="vLLM's older name of use_activation.")
    softmax: bool | None = Field(default=None, description="vLLM's older name of use_activation.")
    truncate_prompt_tokens: int | None = Field(
        default=None, ge=-1, description="Accepted for vLLM clients; salmon truncates a prompt from its start "
        "at the service's max_prompt_tokens whatever this says.")
    user: Text | None = Field(default=None, description="Accepted and ignored.")
    request_id: Text | None = Field(default=None, description="Echoed in the response id.")
    priority: int = Field(default=0, description="Accepted and ignored (one queue).")
    add_special_tokens: bool | None = Field(default=None, description="Accepted and ignored: the renderer "
                                            "adds what the chat template says.")

    @field_validator("input", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        flat = v if isinstance(v, list) else [v]
        if any(isinstance(x, int | list) and not isinstance(x, bool) for x in flat):
            raise ValueError("token ids are not accepted: salmon renders the principles, prompt and response "
                             "itself; send the text")
        if isinstance(v, list) and not v:
            raise ValueError("give at least one text")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> PoolingInput:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of 'input' (texts) and 'messages' (one conversation)")
        return self

    @property
    def activate(self) -> bool:
        flags = [f for f in (self.use_activation, self.activation, self.softmax) if f is not None]
        return bool(flags and flags[0])


class ClassifyRequest(PoolingInput):
    """vLLM's ClassificationRequest, as ``POST /classify`` takes it."""


class PoolingRequest(PoolingInput):
    """vLLM's PoolingRequest, as ``POST /pooling`` takes it."""

    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="float: data is [score]; base64: the score as base64 float32 bytes.")
    embed_dtype: Literal["float32"] = Field(default="float32", description="Only float32.")
    endianness: Literal["native", "little", "big"] = Field(default="native", description="For base64.")
    task: Text | None = Field(default=None, description="Accepted and ignored: the only task is the reward.")
    dimensions: None = Field(default=None, description="Embeddings only; not served here.")
    normalize: bool | None = Field(default=None, description="Accepted and ignored.")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class PoolingUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens the model processed, cached ones included.")
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails,
                                                       description="cached_tokens: served from the prefix cache.")


class ClassificationData(BaseModel):
    index: int
    label: str = Field(default="reward", description="Always 'reward': one class, the score.")
    probs: list[float] = Field(description="[score] (raw, or sigmoid(score) with use_activation).")
    num_classes: int = 1


class PoolingData(BaseModel):
    index: int
    object: str = "pooling"
    data: list[float] | str = Field(description="[score], or its float32 bytes in base64.")


class PoolingResponseBase(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    usage: PoolingUsage
    model_version: str = Field(description="salmon: the scorer version that produced these scores.")
    principle_set: str = Field(description="salmon: name@hash of the set used.")
    principle_set_hash: str


class ClassificationResponse(PoolingResponseBase):
    data: list[ClassificationData]


class PoolingResponse(PoolingResponseBase):
    data: list[PoolingData]


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


# -- generation (POST /v1/generate) ----------------------------------------------------------------------
class SearchOptions(BaseModel):
    """Overrides of the RAIN search's knobs (rm_core.rain.RainConfig); each left out keeps the default."""

    model_config = ConfigDict(extra="forbid")

    max_expansions: int | None = Field(default=None, ge=1, description="Search iterations at most (server limit: "
                                       "generate_max_expansions).")
    candidates: int | None = Field(default=None, ge=1, le=16, description="Segments sampled per expansion.")
    min_segment_tokens: int | None = Field(default=None, ge=1)
    max_segment_tokens: int | None = Field(default=None, ge=1)
    segment_growth: float | None = Field(default=None, ge=1.0, le=8.0)
    c_puct: float | None = Field(default=None, ge=0, le=100.0)
    commit_visits: int | None = Field(default=None, ge=1)
    confident_share: float | None = Field(default=None, gt=0, le=1)
    value_margin: float | None = Field(default=None, ge=0)
    rewind_after: int | None = Field(default=None, ge=1)
    max_rewinds_per_step: int | None = Field(default=None, ge=0)
    value_per_token: bool | None = None
    finish: Literal["sample", "stop"] | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text | list[ChatMessage] = Field(description="The instruction: a string or chat messages ending with a user turn.")
    principle_set: Text | None = Field(
        default=None, description="A registered set: 'name' (its current content) or 'name@hash' (exact content).")
    principles: list[Text | InlinePrinciple] | None = Field(
        default=None, description="Inline principles; win over principle_set. A string is a definition.")
    negate: list[Text] = Field(default_factory=list, description="Names of principles to generate under in "
                               "their negated form.")
    truncate: bool = Field(default=True, description="Truncate an over-long prompt from the start; false → 422.")
    search: Literal["rain", "none"] = Field(
        default="rain", description="rain: search over segments valued by the scorer under the principles; "
        "none: plain sampling.")
    stream: bool = Field(default=False, description="true: server-sent events (segment events, then done).")
    max_new_tokens: int | None = Field(default=None, ge=1, description="Tokens at most (server limit: "
                                       "generate_max_new_tokens).")
    time_budget_s: float | None = Field(default=None, gt=0, description="Wall-time deadline (server limit: "
                                        "generate_max_time_s).")
    temperature: float | None = Field(default=None, ge=0.05, le=10.0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, description="Same seed, same request, same model: same text.")
    options: SearchOptions | None = Field(default=None, description="RAIN's search knobs.")

    _nonempty = field_validator("principles")(_principles_given)


class GenerateStats(BaseModel):
    search: str
    expansions: int = Field(description="Leaves expanded (candidate segments sampled and valued).")
    iterations: int = Field(description="Search iterations: expansions and revisits of finished branches.")
    rewinds: int = Field(description="Times every branch fell below the committed prefix and was resampled.")
    commits: int
    forced_commits: int = Field(description="Commits made after the rewinds at one position ran out.")
    value_evaluations: int = Field(description="Responses valued by the scorer.")
    tokens_sampled: int
    tokens_committed: int
    max_segment_tokens_used: int
    wall_s: float
    stopped: str = Field(description="eos | max_new_tokens | max_expansions | deadline | cancelled")
    final_value: float | None = Field(default=None, description="The scorer's value of the answer (per token "
                                      "when value_per_token).")


class GenerateUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    text: str
    search: Literal["rain", "none"]
    finish_reason: str = Field(description="Why generation stopped (stats.stopped).")
    stats: GenerateStats
    model_version: str = Field(description="The scorer version that valued the search.")
    scorer: str
    principle_set_hash: str
    principle_set: str
    usage: GenerateUsage
