"""GRPO on TRL's GRPOTrainer: group-relative advantages from the reward service, no value model."""

from __future__ import annotations

from typing import Any

from policy_trainer.methods.base import BuildContext, Method
from policy_trainer.methods.trl_args import common_args, online_args, peft_config


def grpo_args(ctx: BuildContext) -> dict[str, Any]:
    """GRPOConfig's fields beyond the common and online ones."""
    t = ctx.cfg.training
    own: dict[str, Any] = {"scale_rewards": t.scale_rewards}
    if t.loss_type:
        own["loss_type"] = t.loss_type
    return own


def build(ctx: BuildContext) -> Any:
    from trl import GRPOConfig, GRPOTrainer

    funcs, weights = ctx.trl_rewards()
    args = GRPOConfig(**common_args(ctx.cfg), **online_args(ctx.cfg), **grpo_args(ctx), reward_weights=weights)
    return GRPOTrainer(model=str(ctx.model_dir), args=args, reward_funcs=funcs,
                       train_dataset=ctx.prompt_dataset(), peft_config=peft_config(ctx.cfg), callbacks=ctx.callbacks)


METHOD = Method(name="grpo", summary="TRL's GRPOTrainer: group-relative advantages, no value model", build=build)
