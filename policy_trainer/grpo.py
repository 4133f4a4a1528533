"""GRPO wiring: RunConfig -> TRL GRPOConfig + GRPOTrainer. Only TRL-specific glue lives here."""

from __future__ import annotations

from typing import Any

from policy_trainer.config import RunConfig


def build_trainer(cfg: RunConfig, *, model: str, common: dict[str, Any], **trainer_kwargs: Any):
    from trl import GRPOConfig, GRPOTrainer

    t = cfg.training
    extra: dict[str, Any] = {"scale_rewards": t.scale_rewards}
    if t.loss_type:
        extra["loss_type"] = t.loss_type
    args = GRPOConfig(**common, **extra)
    return GRPOTrainer(model=model, args=args, **trainer_kwargs)
