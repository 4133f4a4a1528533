"""The ``sami:`` and ``dno:`` sections of the run config: iterated methods (generate -> train -> regenerate).

Both run ``iterations`` rounds. Each round draws ``prompts_per_iteration`` prompts from ``data:``
(a seeded permutation, minus the held-out ones), generates with the current policy, trains on what
it generated, and then evaluates: the policy answers the ``heldout_prompts`` (the LAST prompts of
``data:``, never trained on) greedily and the reward service scores the answers under the run's
principle set. The rest of a run uses the sections GRPO uses: ``policy`` (LoRA), ``data``,
``reward``, ``principles.set``, ``training.max_completion_length`` / ``temperature`` / ``top_p`` /
``per_device_train_batch_size`` / ``seed`` / ``learning_rate`` (DNO), ``output``.

    algorithm: sami
    sami: {iterations: 2, prompts_per_iteration: 4, num_constitutions: 2, learning_rate: 1e-4}

    algorithm: dno
    dno: {iterations: 2, num_samples: 4, margin: 0.5, replay_share: 0.25, beta: 0.1}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from policy_trainer.section import Section


class IterativeSettings(Section):
    iterations: int = Field(default=2, ge=1, description="Rounds of generate -> train -> evaluate.")
    prompts_per_iteration: int = Field(default=4, ge=1, description="Training prompts drawn per round.")
    heldout_prompts: int = Field(default=4, ge=1, description="The last N prompts of data: are held out: the "
                                 "report's per-round service score (and SAMI's MI estimate) is measured on them.")
    eval_max_new_tokens: int | None = Field(default=None, ge=1, description="Token cap of the held-out answers "
                                            "(None: training.max_completion_length).")


class SAMISettings(IterativeSettings):
    num_constitutions: int = Field(default=2, ge=2, description="C: constitutions per query. Each is every "
                                   "principle of the set, as its definition or its negative_definition, in "
                                   "shuffled order; the C sign patterns of a query are distinct, so C may be at "
                                   "most 2^(principles with a negative_definition).")
    learning_rate: float = Field(default=5e-7, gt=0, description="SAMI's paper: 5e-7 (full fine-tuning). With "
                                 "LoRA on a CPU budget a larger rate is needed to move at all (the CPU config: 1e-4).")
    optimizer: Literal["rmsprop", "adamw"] = Field(default="rmsprop", description="SAMI's paper: RMSprop.")
    kl_coef: float = Field(default=0.0, ge=0, description="Weight of a KL term to the initial model (the base "
                           "with the adapter off) on the diagonal responses; 0 skips the reference pass.")
    epochs: int = Field(default=1, ge=1, description="Passes over each round's generated data.")
    queries_per_step: int = Field(default=1, ge=1, description="Queries (each a C x C matrix) per optimizer step.")


class DNOSettings(IterativeSettings):
    num_samples: int = Field(default=4, ge=2, description="K: responses sampled per prompt from the current policy.")
    margin: float = Field(default=0.5, ge=0, description="A pair is kept only when the chosen response's service "
                          "score is at least this much above the rejected one's.")
    replay_share: float = Field(default=0.25, ge=0, lt=1, description="Share of each round's DPO set drawn from "
                                "earlier rounds' pairs (as far as there are enough).")
    beta: float = Field(default=0.1, gt=0, description="DPO's beta; the reference is the previous iterate.")
    epochs: int = Field(default=1, ge=1, description="DPO passes over each round's pairs.")
    teacher_file: str | None = Field(default=None, description="JSONL of {prompt_id, response}: a teacher's "
                                     "answer, scored with the samples and paired like them (either side may win).")
    keep_best: bool = Field(default=True, description="Save the iterate with the best held-out service score to "
                            "output_dir/best (the initial policy counts: when no round beats it, nothing is saved).")
