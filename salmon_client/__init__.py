"""The public client of salmon's reward service, and reward functions for the RL frameworks people use.

::

    from salmon_client import SalmonClient

    with SalmonClient("http://127.0.0.1:8000") as client:       # key from $SALMON_API_KEY
        r = client.score([("What is 2+2?", "4."), ("What is 2+2?", "Four, obviously.")],
                         principle_set="concise")             # a name, name@hash, or a YAML file
        r.scores, r.model_version, r.principle_set, r.principle_set_hash

- :class:`AsyncSalmonClient` (``await client.score(...)``) and :class:`SalmonClient` are one client:
  the sync one runs the async one on a private event loop. Both retry 429/5xx/connection errors with
  backoff and ``Retry-After`` within a time budget, split on 413 (and remember the smaller size),
  and register again a set the service forgot. policy_trainer's RL runs use the same class.
- ``salmon_client.verl``: ``compute_score`` / ``compute_score_batch`` / ``compute_score_async`` for
  verl's ``custom_reward_function``.
- ``salmon_client.openrlhf``: a file for OpenRLHF's ``--remote_rm_url path/to/file.py``.
- TRL: ``policy_trainer.reward_funcs`` builds the reward functions for a GRPOTrainer.

The layering (docs/architecture.md): this package uses ``principles`` and ``salmon`` only, so a
reward worker that imports it loads no torch and no model.
"""

from salmon_client.client import (
    AsyncSalmonClient,
    Group,
    RetryPolicy,
    RewardServiceError,
    SalmonClient,
    ScoreResult,
    shared_client,
)

__all__ = [
    "AsyncSalmonClient",
    "Group",
    "RetryPolicy",
    "RewardServiceError",
    "SalmonClient",
    "ScoreResult",
    "shared_client",
]
