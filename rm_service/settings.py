"""Service settings: defaults that run on a laptop CPU; every knob a GPU machine needs is a field.

Sources, later wins: defaults < YAML file (``salmon serve --config``) < ``SALMON_*`` env vars <
CLI flags. Secrets (``SALMON_API_KEY``, ``SALMON_ADMIN_KEY``) come from the environment.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from rm_core.scorer_table import describe, get_spec, scorer_choices


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SALMON_", extra="forbid")

    # -- what scores ---------------------------------------------------------------------------
    # The scorer table (rm_core.scorer_table) is the one list of kinds: this field, `salmon serve/score
    # --scorer` and ModelManager.build all read it, at validation time, so a kind registered later counts.
    scorer: str = Field(
        default="auto",
        description=describe() + " A kind registered in rm_core.scorer_table at run time is accepted too.",
    )
    model: str = Field(default="embedded", description="Causal LM for zero-shot scorers: 'embedded', a .gguf, or a local HF dir.")
    registry: Path | None = Field(default=None, description="Reward-model registry directory (CURRENT + versions).")
    watch_registry: bool = Field(default=True, description="Reload when the registry's CURRENT changes.")
    watch_interval_s: float = Field(default=2.0, gt=0)
    default_principle_set: str = Field(default="hhh", description="Set used when a request names none: shipped name or YAML path.")
    principle_sets_dir: Path | None = Field(default=None, description="Extra YAML sets to register at start.")
    contrast: Literal["per_principle", "whole_set"] = Field(
        default="per_principle",
        description="contrastive scorer: negate each principle on its own (k+1 passes, more accurate) or the whole set at once (2 passes).",
    )
    contrast_adapter: Path | None = Field(
        default=None,
        description="contrastive scorer: a `salmon contrast-tune` output directory; its LoRA is verified "
        "against its manifest and merged into the model.",
    )
    rule_pattern: str = Field(default=r"\bplease\b", description="rule scorer: regex whose matches count +1 each.")
    rule_length_penalty: float = Field(default=0.0, ge=0, description="rule scorer: subtracted per response character.")

    # -- where it runs -------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    device: str = "auto"
    num_threads: int | None = Field(default=None, description="torch intra-op threads on CPU (None: torch default).")

    # -- batching and limits -------------------------------------------------------------------
    max_batch_tokens: int = Field(default=4096, ge=64, description="Padded tokens per forward pass.")
    max_padding: float = Field(
        default=0.25, ge=0,
        description="Split a length-sorted batch before its pad tokens exceed this share of its real tokens. "
        "Pads cost real FLOPs on a compute-bound CPU; on a GPU, where fewer larger batches win, raise it (e.g. 1.0).")
    max_queue_items: int = Field(default=1024, ge=1, description="Items waiting to be scored; beyond → 429.")
    batch_wait_ms: float = Field(default=2.0, ge=0, description="How long the worker waits to fill a batch.")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_items: int = Field(default=256, ge=1, description="Items per /v1/score request.")
    max_prompt_tokens: int = Field(default=1024, ge=8)
    max_response_tokens: int = Field(default=1024, ge=8)
    max_messages: int = Field(default=64, ge=1, description="Chat messages per prompt.")
    max_principles: int = Field(default=32, ge=1, description="Inline principles per request.")
    request_timeout_s: float = Field(default=120.0, gt=0, description="A request waiting longer gets 503.")

    # -- generation (POST /v1/generate) ----------------------------------------------------------
    generate_max_new_tokens: int = Field(default=256, ge=1, description="Tokens one generation may ask for.")
    generate_max_expansions: int = Field(default=256, ge=1, description="RAIN search iterations one generation may ask for.")
    generate_max_time_s: float = Field(default=120.0, gt=0, description="Wall-time budget one generation may ask for.")
    generate_concurrency: int = Field(
        default=1, ge=1, description="Generations running at once; beyond → 429. Each one's value calls go "
        "through the scoring batcher, so scoring requests are served between them.")

    # -- prefix cache ----------------------------------------------------------------------------
    prefix_cache: bool = Field(default=True, description="Reuse key/value caches of shared prefixes.")
    prefix_cache_bytes: int = Field(default=512 * 1024 * 1024, ge=0)
    prefix_attention: Literal["auto", "expanded"] = Field(
        default="auto",
        description="How suffixes attend to a cached prefix. auto: the cascade (prefix keys/values used as "
        "cached, merged by log-sum-exp) where torch's fused CPU kernel exists, else expanded. expanded: the "
        "prefix cache copied to every row with a mask (what GPU runs use).")

    # -- security ------------------------------------------------------------------------------
    api_key: SecretStr | None = Field(default=None, description="Bearer key for everything but health (SALMON_API_KEY).")
    admin_key: SecretStr | None = Field(default=None, description="Bearer key for set writes and reload (SALMON_ADMIN_KEY).")
    insecure: bool = Field(default=False, description="Allow a non-loopback bind without an API key.")

    @field_validator("scorer", mode="before")
    @classmethod
    def _registered_scorer(cls, v: Any) -> Any:
        choices = scorer_choices()
        if v not in choices:
            # The same error a Literal of the choices gives, so a bad value reads as it always has.
            expected = ", ".join(map(repr, choices[:-1])) + f" or {choices[-1]!r}" if len(choices) > 1 else repr(choices[0])
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return v

    @field_validator("api_key", "admin_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v):
        # SALMON_API_KEY= (set but empty) means "no key", not "the empty string is the key".
        return None if v is None or (isinstance(v, str) and not v.strip()) else v

    @model_validator(mode="after")
    def _consistent(self) -> ServiceSettings:
        if self.scorer != "auto" and get_spec(self.scorer).needs_registry and self.registry is None:
            raise ValueError(f"scorer {self.scorer!r} needs 'registry' (a registry directory)")
        return self

    @property
    def is_loopback(self) -> bool:
        # An IP literal in 127.0.0.0/8 or ::1, or 'localhost'; a name like '127.0.0.1.example.org' is not.
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
