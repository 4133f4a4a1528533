"""RLOO wiring: RunConfig -> TRL RLOOConfig + RLOOTrainer. Only TRL-specific glue lives here."""

from __future__ import annotations

from typing import Any

from policy_trainer.config import RunConfig


def build_trainer(cfg: RunConfig, *, model: str, common: dict[str, Any], **trainer_kwargs: Any):
    from trl import RLOOConfig, RLOOTrainer

    args = RLOOConfig(**common, normalize_advantages=cfg.training.normalize_advantages)
    return RLOOTrainer(model=model, args=args, **trainer_kwargs)
