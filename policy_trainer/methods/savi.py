"""VideoSAVi (``savi:``): self-critique pairs scored by the service, then DPO; on passages with a causal LM
(policy_trainer.savi, DPO as DNO does it) or on videos with a vision-language model (``savi.videos``:
policy_trainer.savi_video)."""

from __future__ import annotations

from typing import Any

from policy_trainer.methods.base import BuildContext, Method
from policy_trainer.savi_config import SAVISettings


def build(ctx: BuildContext) -> Any:
    if ctx.cfg.savi.videos:
        from policy_trainer.savi_video import VideoSAVITrainer

        return VideoSAVITrainer(ctx.cfg, model_dir=ctx.model_dir, reward=ctx.reward_service(), callbacks=ctx.callbacks)
    from policy_trainer.savi import SAVITrainer

    return SAVITrainer(ctx.cfg, model_dir=ctx.model_dir, reward=ctx.reward_service(), callbacks=ctx.callbacks)


METHOD = Method(name="savi", summary="VideoSAVi (passages, or videos with savi.videos): questions, answer, self-critique, refine; DPO on refined > "
                "initial pairs the service prefers", build=build, section="savi", settings=SAVISettings, step_rewards=False)
