"""RL with rewards from the principle-following reward service over HTTP: TRL's GRPO and RLOO, and
our own PPO with a value model (ppo.py; TRL no longer ships one).

Public API (imported lazily, so `salmon train --help` does not load torch)::

    from policy_trainer import RunConfig, load_run_config, run_training
    result = run_training(load_run_config("run.yaml"))   # -> RunResult
    result.summary["reward_wait_share"], result.report_png, result.rollouts_dir

    from policy_trainer import reward_funcs              # TRL: salmon's rewards in your own trainer
    GRPOTrainer(..., reward_funcs=reward_funcs(url="http://127.0.0.1:8000", principle_set="concise"))

``run_training`` raises ``salmon.errors.UserError`` for bad input and ``TrainingAborted`` (with
``.checkpoint``) when the reward service stays unreachable past the retry budget.

The training methods are one table, policy_trainer.methods (one module per method: grpo and rloo
hold only the TRL wiring, ppo the wiring of our PPO in ppo/ppo_math/ppo_config); config, CLI and
demo read their names from it. Parts shared by the methods: config, train (the runner),
reward_service (set up only for a method that uses it, through salmon_client, the one HTTP client;
principles_select, RL-time selection + set timeline; shaping; rewards, the reward callables;
rollouts, shards for on-policy RM retraining), report.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "RunConfig": "policy_trainer.config",
    "load_run_config": "policy_trainer.config",
    "run_training": "policy_trainer.train",
    "RunResult": "policy_trainer.train",
    "TrainingAborted": "policy_trainer.reward_service",
    "reward_funcs": "policy_trainer.reward_service",
    "SARReward": "policy_trainer.self_reward",
    "CorrectnessReward": "policy_trainer.self_reward",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'policy_trainer' has no attribute {name!r}")
