"""salmon as OpenRLHF's reward: a file for ``--remote_rm_url path/to/openrlhf.py``.

OpenRLHF loads this file by path and calls ``reward_func(queries, prompts, labels)`` with the
chat-templated texts it generated (prompt + response), their prompts and the ``--label_key``
values. Unlike pointing ``--remote_rm_url`` at ``http://host:8000/get_reward`` (which still works
for a service without a key: OpenRLHF's own client sends no headers), this sends the API key and the
run's principle set, and retries as salmon's client does::

    export SALMON_URL=http://127.0.0.1:8000 SALMON_API_KEY=... SALMON_PRINCIPLE_SET=concise
    python -m openrlhf.cli.train_ppo_ray ... \\
      --remote_rm_url $(python -c "import salmon_client.openrlhf as m; print(m.__file__)")

``SALMON_PRINCIPLE_SET`` is a registered name, ``name@hash`` or a YAML file (registered once, which
needs ``SALMON_ADMIN_KEY`` when the service has an admin key); unset, the service's default set.
The texts are scored on ``/get_reward``: the service splits each into turns with the served model's
chat template, and where a text does not follow it, its prompt marks where the response starts.

Returns ``{"rewards", "scores", "extra_logs"}`` as OpenRLHF's reward functions do: the service's
scores as float tensors (lists when torch is missing), ``scores`` equal to ``rewards``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from salmon_client.client import shared_client

SET_ENV = "SALMON_PRINCIPLE_SET"
log = logging.getLogger(__name__)


def reward_func(queries: Sequence[str], prompts: Sequence[str] | None = None, labels: Sequence[Any] | None = None,
                **kwargs: Any) -> dict[str, Any]:
    """One score per query, in order; labels are accepted and not used (the principles are the criterion)."""
    if isinstance(queries, str):
        raise ValueError("reward_func: queries must be a list of texts, not one string")
    result = shared_client(os.environ.get("SALMON_URL")).get_reward(
        [str(q) for q in queries], [str(p) for p in prompts] if prompts is not None else None,
        principle_set=os.environ.get(SET_ENV) or None)
    log.debug("salmon scored %d queries with %s under %s", len(queries), result.model_version, result.principle_set)
    rewards = _tensor(result.scores)
    return {"rewards": rewards, "scores": rewards, "extra_logs": {}}


def _tensor(values: list[float]) -> Any:
    try:
        import torch
    except ImportError:  # a client without torch (OpenRLHF always has it)
        return values
    return torch.tensor(values, dtype=torch.float32)
