"""The ``sft:`` section of the run config: supervised fine-tuning on (prompt, completion) rows (policy_trainer.sft).

SELF-ALIGN's principle engraving and I-SHEEP's self-training are this method: the policy learns to
give the kept answers to the bare prompts, with no rules or exemplars in its context.

    algorithm: sft
    policy: {model: embedded, lora: {r: 16}}
    sft: {data: runs/self_align/answers.jsonl}     # {prompt, completion} per line
    training: {max_steps: 30, learning_rate: 2.0e-4, per_device_train_batch_size: 4}
    rewards: {service: 0}                          # optional: sft never contacts the service
"""

from __future__ import annotations

from pydantic import Field

from policy_trainer.section import Section


class SFTSettings(Section):
    data: str | None = Field(default=None, description="JSONL of {prompt, completion}: prompt is text or chat "
                             "messages ending with a user turn, completion the answer to learn. Required by "
                             "algorithm: sft.")
    max_length: int = Field(default=512, ge=8, description="Tokens per rendered row (prompt + completion); "
                            "longer rows are cut at the end.")
    merge: bool = Field(default=True, description="After training, merge the LoRA adapter into the base and "
                        "save the result to output_dir/merged, a model directory salmon's loader reads.")
