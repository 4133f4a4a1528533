"""DNO on TRL's DPOTrainer (policy_trainer.dno): on-policy large-margin pairs, reference = previous iterate, ``dno:``."""

from __future__ import annotations

from typing import Any

from policy_trainer.iterative_config import DNOSettings
from policy_trainer.methods.base import BuildContext, Method


def build(ctx: BuildContext) -> Any:
    from policy_trainer.dno import DNOTrainer

    return DNOTrainer(ctx.cfg, model_dir=ctx.model_dir, reward=ctx.reward_service(), callbacks=ctx.callbacks)


METHOD = Method(name="dno", summary="DNO: iterated DPO on scored on-policy pairs, reference = previous iterate",
                build=build, section="dno", settings=DNOSettings, step_rewards=False)
