"""Supervised fine-tuning on TRL's SFTTrainer + LoRA (policy_trainer.sft): {prompt, completion} rows, ``sft:``."""

from __future__ import annotations

from typing import Any

from policy_trainer.methods.base import BuildContext, Method
from policy_trainer.sft_config import SFTSettings


def build(ctx: BuildContext) -> Any:
    from policy_trainer.sft import build_sft_trainer

    return build_sft_trainer(ctx.cfg, ctx.model_dir, ctx.callbacks)


# No reward service: the rows say what to learn.
METHOD = Method(name="sft", summary="supervised fine-tuning (TRL SFTTrainer + LoRA) on {prompt, completion} rows",
                build=build, uses_reward_service=False, step_rewards=False, section="sft", settings=SFTSettings)
