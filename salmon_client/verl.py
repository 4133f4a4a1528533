"""salmon as verl's reward: ``custom_reward_function`` entry points that score through salmon's client.

verl loads this file by path and calls one function of it (``custom_reward_function.name``)::

    custom_reward_function:
      path: /path/to/site-packages/salmon_client/verl.py   # python -c "import salmon_client.verl as m; print(m.__file__)"
      name: compute_score          # naive/prime/dapo managers; compute_score_batch with reward_manager=batch;
                                   # compute_score_async in verl's async reward loop
      reward_kwargs:
        url: http://127.0.0.1:8000 # else $SALMON_URL, else http://127.0.0.1:8000
        principle_set: concise     # a name, name@hash or YAML file; else $SALMON_PRINCIPLE_SET, else the default
    reward_model:
      reward_manager: naive        # or batch (one request per batch of prompts, not one per response)

The API key is ``$SALMON_API_KEY`` (and ``$SALMON_ADMIN_KEY`` to register a set from a file).

verl passes the decoded response (``solution_str``) but not the prompt, so the dataset's
``extra_info`` must carry it: ``extra_info["prompt"]``, text or chat messages (``"question"`` is
read when there is no ``"prompt"``, as verl's own GSM8K preprocessing writes it). A row's
``extra_info["principle_set"]`` wins over the config's. ``ground_truth`` and ``data_source`` are not
used: the principles are the criterion. Each function returns the service's raw score (a float per
response); the client retries what can succeed later and raises what cannot, so a step never trains
on a made-up reward.

This file imports nothing relative (verl loads it as a lone module) and no torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from salmon_client.client import AsyncSalmonClient, PrincipleSpec, SalmonClient, shared_client

SET_ENV = "SALMON_PRINCIPLE_SET"
PROMPT_KEYS = ("prompt", "question")


def compute_score(data_source: Any, solution_str: str, ground_truth: Any = None,
                  extra_info: dict[str, Any] | None = None, **kwargs: Any) -> float:
    """verl's per-response reward function (NaiveRewardManager and the managers built like it)."""
    prompt, spec = _prompt_and_set(extra_info, kwargs, 0)
    return _client(kwargs).score([(prompt, solution_str)], principle_set=spec).scores[0]


async def compute_score_async(data_source: Any, solution_str: str, ground_truth: Any = None,
                              extra_info: dict[str, Any] | None = None, **kwargs: Any) -> float:
    """The same, as a coroutine, for verl's async reward loop (it awaits a coroutine function directly)."""
    prompt, spec = _prompt_and_set(extra_info, kwargs, 0)
    result = await _async_client(kwargs).score([(prompt, solution_str)], principle_set=spec)
    return result.scores[0]


def compute_score_batch(data_sources: Sequence[Any], solution_strs: Sequence[str],
                        ground_truths: Sequence[Any] | None = None,
                        extra_infos: Sequence[dict[str, Any] | None] | None = None, **kwargs: Any) -> list[float]:
    """verl's BatchRewardManager function: lists (or numpy object arrays) in, one score per response out.

    The responses of one prompt go out together (the service computes the shared prefix once), and
    the batch in as few requests as the service's ``max_items`` allows; rows naming different
    principle sets are scored per set."""
    n = len(solution_strs)
    infos = list(extra_infos) if extra_infos is not None else [None] * n
    if len(infos) != n:
        raise ValueError(f"salmon verl reward: {len(infos)} extra_infos for {n} solution_strs")
    by_set: dict[Any, list[tuple[int, Any]]] = {}
    specs: dict[Any, PrincipleSpec] = {}
    for i in range(n):
        prompt, spec = _prompt_and_set(infos[i], kwargs, i)
        key = str(spec) if spec is not None else None
        specs[key] = spec
        by_set.setdefault(key, []).append((i, prompt))
    client = _client(kwargs)
    out = [0.0] * n
    for key, rows in by_set.items():
        result = client.score([(prompt, str(solution_strs[i])) for i, prompt in rows], principle_set=specs[key])
        for (i, _), score in zip(rows, result.scores, strict=True):
            out[i] = score
    return out


def _client(kwargs: dict[str, Any]) -> SalmonClient:
    return shared_client(kwargs.get("url"))


_ASYNC: dict[str | None, AsyncSalmonClient] = {}


def _async_client(kwargs: dict[str, Any]) -> AsyncSalmonClient:
    # One per URL in this process; it follows the event loop that calls it (see AsyncSalmonClient).
    url = kwargs.get("url")
    if url not in _ASYNC:
        _ASYNC[url] = AsyncSalmonClient(url)
    return _ASYNC[url]


def _prompt_and_set(extra_info: Any, kwargs: dict[str, Any], row: int) -> tuple[Any, PrincipleSpec]:
    info = extra_info if isinstance(extra_info, dict) else {}
    prompt = next((info[k] for k in PROMPT_KEYS if info.get(k) is not None), None)
    if prompt is None:
        raise ValueError(f"salmon verl reward: row {row} has no extra_info['prompt']; verl does not pass the prompt "
                         "to a reward function, so put it (text or chat messages) in each row's extra_info when "
                         "preparing the dataset")
    spec = info.get("principle_set") or kwargs.get("principle_set") or os.environ.get(SET_ENV) or None
    return _as_prompt(prompt), spec


def _as_prompt(prompt: Any) -> Any:
    """Text, or chat messages as the service takes them (parquet gives numpy arrays and extra keys)."""
    if isinstance(prompt, str):
        return prompt
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
