"""The ``savi:`` section of the run config: VideoSAVi's self-training loop (policy_trainer.savi).

A round: the policy writes questions about each passage, answers them, critiques its answer, refines
it; an optional grounding filter keeps refined answers close to the passage; the reward service scores
initial and refined answers under the run's principle set (``principles.set: faithful``) and a pair
(refined ≻ initial) is kept only when the service prefers the refined answer by at least ``margin``;
then DPO on the kept pairs exactly as DNO does it (a fresh LoRA on the current iterate, whose
adapter-off self is the reference).

    algorithm: savi
    principles: {set: faithful}
    data: {prompts: policy_trainer/toydata/passages.jsonl}   # {id, prompt: the passage[, questions]}
    savi: {iterations: 2, prompts_per_iteration: 3, heldout_prompts: 3, questions_per_passage: 3}

The video variant (policy_trainer.savi_video) runs the same rounds over frames with a local
vision-language model and trains with TRL's DPOTrainer on rows with an ``images`` column::

    algorithm: savi
    policy: {model: path/to/a/local/vlm}
    savi: {videos: videos.jsonl, frames: 8, iterations: 2, prompts_per_iteration: 2, heldout_prompts: 1}
"""

from __future__ import annotations

from pydantic import Field

from policy_trainer.iterative_config import DNOSettings


class SAVISettings(DNOSettings):
    questions_per_passage: int = Field(default=3, ge=1, description="Questions the policy writes per passage, "
                                       "cycling through the kinds what / why / how.")
    margin: float = Field(default=0.0, ge=0, description="A pair is kept only when the service scores the refined "
                          "answer above the initial one by more than 0 and by at least this much.")
    replay_share: float = Field(default=0.0, ge=0, lt=1, description="Share of each round's DPO set drawn from "
                                "earlier rounds' pairs (as far as there are enough).")
    grounding_min: float | None = Field(default=None, ge=0, le=1, description="Grounding filter: keep a pair only "
                                        "when the refined answer's similarity to the passage (the share of its "
                                        "content words found in the passage) is at least this; None: off.")
    videos: str | None = Field(default=None, description="The video variant: a JSONL of {id, video} (a video file, "
                               "an image or a folder of images; relative paths from the JSONL's folder) and "
                               "policy.model a local vision-language model. The last heldout_prompts videos are "
                               "held out. None: the text variant on data.prompts' passages.")
    frames: int = Field(default=8, ge=1, description="The video variant: frames per video, at uniform segment "
                        "midpoints.")
    critique_max_new_tokens: int | None = Field(default=None, ge=1, description="Token cap of a critique "
                                                "(None: training.max_completion_length).")
