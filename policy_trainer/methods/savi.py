"""VideoSAVi, text-only (policy_trainer.savi): self-critique pairs scored by the service, DPO as DNO does it, ``savi:``."""

from __future__ import annotations

from typing import Any

from policy_trainer.methods.base import BuildContext, Method
from policy_trainer.savi_config import SAVISettings


def build(ctx: BuildContext) -> Any:
    from policy_trainer.savi import SAVITrainer

    return SAVITrainer(ctx.cfg, model_dir=ctx.model_dir, reward=ctx.reward_service(), callbacks=ctx.callbacks)


METHOD = Method(name="savi", summary="VideoSAVi (text): questions, answer, self-critique, refine; DPO on refined > "
                "initial pairs the service prefers", build=build, section="savi", settings=SAVISettings, step_rewards=False)
