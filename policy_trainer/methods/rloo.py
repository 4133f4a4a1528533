"""RLOO on TRL's RLOOTrainer: leave-one-out baselines within each group, KL in the reward."""

from __future__ import annotations

from typing import Any

from policy_trainer.methods.base import BuildContext, Method
from policy_trainer.methods.trl_args import common_args, online_args, peft_config


def rloo_args(ctx: BuildContext) -> dict[str, Any]:
    """RLOOConfig's fields beyond the common and online ones."""
    return {"normalize_advantages": ctx.cfg.training.normalize_advantages}


def build(ctx: BuildContext) -> Any:
    from trl import RLOOConfig, RLOOTrainer

    funcs, weights = ctx.trl_rewards()
    args = RLOOConfig(**common_args(ctx.cfg), **online_args(ctx.cfg), **rloo_args(ctx), reward_weights=weights)
    return RLOOTrainer(model=str(ctx.model_dir), args=args, reward_funcs=funcs,
                       train_dataset=ctx.prompt_dataset(), peft_config=peft_config(ctx.cfg), callbacks=ctx.callbacks)


METHOD = Method(name="rloo", summary="TRL's RLOOTrainer: leave-one-out baselines, KL in the reward", build=build)
