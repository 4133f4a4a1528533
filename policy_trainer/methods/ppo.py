"""PPO with a value model: our trainer (policy_trainer.ppo, TRL has none any more), settings in ``ppo:``."""

from __future__ import annotations

from typing import Any

from policy_trainer.methods.base import BuildContext, Method
from policy_trainer.ppo_config import PPOSettings


def build(ctx: BuildContext) -> Any:
    from policy_trainer.ppo import PPOTrainer
    from salmon.errors import UserError

    r = ctx.cfg.rewards
    if r.correctness or r.sar or r.service != 1.0:
        raise UserError("algorithm ppo takes the service's score only; rewards.correctness, rewards.sar and a "
                        "rewards.service weight other than 1 need grpo or rloo")
    reward = ctx.reward_service()
    return PPOTrainer(ctx.cfg, model_dir=ctx.model_dir, train_dataset=ctx.prompt_dataset(), reward=reward.score,
                      shaping=reward.shaping, callbacks=ctx.callbacks)


METHOD = Method(name="ppo", summary="our PPO with a value model (LoRA policy and value on one base)", build=build,
                section="ppo", settings=PPOSettings)
