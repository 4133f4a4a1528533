"""What a training method is to the runner (policy_trainer.train): one record of the method table.

A method is, as in TRL, a pair of a config and a trainer: its settings (a config section of its
own, or none) and a ``build`` function that turns the run config into a trainer. The runner owns
everything around the trainer: the policy's location, the reward service (only for a method that
says it uses one), resume, the step timer and state saved beside each checkpoint, the report.

``build`` imports its heavy parts (torch, TRL) inside itself: the method table is read by
``salmon train --help`` and by config validation, which must not load torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:
    from policy_trainer.config import RunConfig
    from policy_trainer.reward_service import RewardService
    from policy_trainer.self_reward import LocalRewards

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class Trainer(Protocol):
    """What the runner uses of a trainer (a TRL trainer has all of it; policy_trainer.ppo mimics it).

    Optional, looked up with ``getattr``: ``eos_token_ids`` (else ``processing_class.eos_token_id``),
    ``callback_handler`` (TRL's, to find its TensorBoard writer) and ``async_loop`` (the event loop
    the reward client lives on, closed on it at the end).
    """

    state: Any          # global_step, max_steps, log_history
    accelerator: Any    # process_index, is_main_process
    model: Any

    def train(self, resume_from_checkpoint: str | None = None) -> Any: ...

    def _save_checkpoint(self, model: Any, trial: Any) -> None: ...


@dataclass
class BuildContext:
    """What ``Method.build`` gets from the runner."""

    cfg: RunConfig
    model_dir: Path
    callbacks: list[Any] = field(default_factory=list)  # the runner's (timer, state saver), then the caller's
    reward: RewardService | None = None                  # set when the method uses the service and rewards.service > 0
    local: LocalRewards | None = None                    # in-trainer rewards (correctness, SAR), bound after build
    local_taken: bool = False                            # set by trl_rewards: the method uses them

    def prompt_dataset(self) -> Any:
        """The run's prompts (``data:``) as a datasets.Dataset of {prompt, prompt_id, prompt_type[, answer]}."""
        from policy_trainer.data import load_prompt_dataset

        return load_prompt_dataset(self.cfg.data, require_answer=bool(self.cfg.rewards.correctness))

    def trl_rewards(self) -> tuple[list[Any], list[float]]:
        """TRL's ``reward_funcs`` and ``reward_weights``: the service's score (weight ``rewards.service``) and
        its shaping terms (weight 1) when the run uses the service, then the in-trainer rewards."""
        funcs: list[Any] = []
        weights: list[float] = []
        if self.reward is not None:
            funcs += self.reward.reward_funcs
            weights += [self.cfg.rewards.service] + [1.0] * (len(funcs) - 1)
        if self.local is not None:
            self.local_taken = True
            more, w = self.local.funcs_and_weights()
            funcs += more
            weights += w
        if not funcs:
            raise RuntimeError("no reward function: rewards.service is 0 and no in-trainer reward is on")
        return funcs, weights

    def reward_service(self) -> RewardService:
        """The reward service, for a method that declared ``uses_reward_service``."""
        if self.reward is None and not self.cfg.rewards.service:
            from salmon.errors import UserError

            raise UserError(f"algorithm {self.cfg.algorithm} needs the reward service's score; rewards.service: 0 "
                            "(in-trainer rewards only) works with grpo and rloo")
        if self.reward is None:
            raise RuntimeError("this method needs the reward service but its Method says uses_reward_service=False")
        return self.reward


@dataclass(frozen=True)
class Method:
    """One training method: the value of ``algorithm:`` and ``salmon train --algorithm``."""

    name: str
    summary: str  # one line, for help texts
    build: Callable[[BuildContext], Trainer]
    uses_reward_service: bool = True  # False: the run never contacts reward.url
    # True: every step is scored by the service and the report logs its mean reward and length, which is
    # what `salmon demo` compares across two principle sets; iterated methods report per round instead.
    step_rewards: bool = True
    section: str | None = None  # the RunConfig field holding the method's own settings
    settings: type[BaseModel] | None = None  # that field's model

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"method name {self.name!r} must match {NAME_RE.pattern}")
        if (self.section is None) != (self.settings is None):
            raise ValueError(f"method {self.name!r}: section and settings go together (both or neither)")
