"""The base of every run-config section (policy_trainer.config and each method's own section).

In a module of its own so that a method's section (e.g. policy_trainer.ppo_config) and the run
config, which holds those sections, share it without importing each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section whose unknown fields are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")
