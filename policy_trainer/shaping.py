"""SALMON's reward shaping, free of TRL and HTTP (GRPO, RLOO and PPO share it).

- Capped length bonus ``scale * min(tokens / per_tokens * multiplier[type], cap)``: SALMON added
  it because its reward model preferred short answers; the per-type multiplier is negative for
  reasoning prompts, where padding hurts.
- Unfinished penalty: a completion cut at ``max_completion_length`` (no end-of-sequence token) is
  not an answer; SALMON penalised those instead of letting the RM grade a fragment.
- Running normalisation of the service's scores (whitening with a running mean/std), for reward
  models whose scale drifts between registry versions.

KL to the reference is TRL's (``training.beta``), not done here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from policy_trainer.config import LengthBonusConfig, ShapingConfig


def length_bonus(n_tokens: int, prompt_type: str | None, cfg: LengthBonusConfig) -> float:
    if not cfg.enabled:
        return 0.0
    mult = cfg.multipliers.get(prompt_type or "general", cfg.default_multiplier)
    return cfg.scale * min(n_tokens / cfg.per_tokens * mult, cfg.cap)


def is_finished(completion_ids: Sequence[int], eos_token_ids: Iterable[int]) -> bool:
    """TRL cuts completions after the first EOS, so a finished one ends with it."""
    return bool(completion_ids) and completion_ids[-1] in set(eos_token_ids)


def shaping_terms(completion_ids: Sequence[Sequence[int]], prompt_types: Sequence[str | None],
                  eos_token_ids: Iterable[int], cfg: ShapingConfig) -> list[float]:
    """The reward added to each completion on top of the (scaled) service score."""
    eos = list(eos_token_ids)
    out = []
    for ids, t in zip(completion_ids, prompt_types, strict=True):
        term = length_bonus(len(ids), t, cfg.length_bonus)
        if cfg.unfinished_penalty and not is_finished(ids, eos):
            term -= cfg.unfinished_penalty
        out.append(term)
    return out


@dataclass
class RunningNormalizer:
    """Running mean/variance (Chan et al. parallel update); state goes into the checkpoint."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0
    eps: float = 1e-6

    def update(self, values: Sequence[float]) -> None:
        n = len(values)
        if n == 0:
            return
        b_mean = sum(values) / n
        b_m2 = sum((v - b_mean) ** 2 for v in values)
        delta = b_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += b_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def normalize(self, values: Sequence[float]) -> list[float]:
        """Update with this batch first so the very first batch is whitened by its own statistics."""
        self.update(values)
        return [(v - self.mean) / (self.std + self.eps) for v in values]

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


def scale_scores(scores: Sequence[float], cfg: ShapingConfig, normalizer: RunningNormalizer | None) -> list[float]:
    """Service scores -> the RM part of the reward (normalised, then scaled)."""
    vals = list(scores)
    if cfg.normalize == "running":
        if normalizer is None:
            raise ValueError("normalize: running needs a RunningNormalizer")
        vals = normalizer.normalize(vals)
    return [cfg.rm_scale * v for v in vals]
