"""SAMI on our loop (policy_trainer.sami): constitutions -> own answers -> symmetric InfoNCE, settings in ``sami:``."""

from __future__ import annotations

from typing import Any

from policy_trainer.iterative_config import SAMISettings
from policy_trainer.methods.base import BuildContext, Method


def build(ctx: BuildContext) -> Any:
    from policy_trainer.sami import SAMITrainer

    return SAMITrainer(ctx.cfg, model_dir=ctx.model_dir, reward=ctx.reward_service(), callbacks=ctx.callbacks)


# It uses the reward service to evaluate, not to train: the held-out score of every round.
METHOD = Method(name="sami", summary="SAMI: mutual information between constitutions and answers, no labels",
                build=build, section="sami", settings=SAMISettings, step_rewards=False)
