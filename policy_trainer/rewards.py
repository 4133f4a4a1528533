"""TRL reward callables: the service's score (async, over HTTP) and SALMON's shaping terms (local).

They are two reward functions rather than one on purpose: TRL logs each function's mean under
``rewards/<name>/mean``, so ``rewards/salmon_rm/mean`` is exactly what the service returned (times
``shaping.rm_scale``), and the shaping shows up on its own line.

``ServiceReward`` is where one generation batch meets the rest of the system: it picks the active
principle set (schedule / control file), selects principles per prompt, sends the groups through
the one client, exports the rollout shard, and times the wait (the report's reward-latency share).
It raises :class:`~salmon_client.RewardServiceError` when the service cannot answer:
TRL propagates it out of ``train()`` and the runner checkpoints and exits non-zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from policy_trainer.config import ShapingConfig
from policy_trainer.principles_select import PrincipleSelector, Selection, SetTimeline
from policy_trainer.rollouts import RolloutWriter, policy_version
from policy_trainer.shaping import RunningNormalizer, scale_scores, shaping_terms
from principles.schema import PrincipleSet
from salmon_client.client import AsyncSalmonClient, Group

log = logging.getLogger(__name__)


def completion_text(completion: Any) -> str:
    """TRL passes conversational completions as ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))


def prompt_key(prompt: Any) -> str:
    """A stable id for a prompt given as text or chat messages (sha256 of its JSON, 12 hex digits)."""
    blob = json.dumps(_service_prompt(prompt), sort_keys=True, ensure_ascii=False)
    return "p-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def principle_payload(sel: Selection) -> list[dict[str, str]]:
    out = []
    for p in sel.principles:
        d = {"name": p.name, "definition": p.definition}
        if p.negative_definition:
            d["negative_definition"] = p.negative_definition
        out.append(d)
    return out


class ShapingReward:
    """Sync TRL reward function: length bonus + unfinished penalty (see policy_trainer.shaping)."""

    __name__ = "shaping"

    def __init__(self, cfg: ShapingConfig, eos_token_ids: Sequence[int] = ()):
        self.cfg = cfg
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                 prompt_type: list[str] | None = None, **_: Any) -> list[float]:
        types = prompt_type or [None] * len(completions)
        return shaping_terms(completion_ids, types, self.eos_token_ids, self.cfg)


class ServiceReward:
    """Async TRL reward function scoring a generation batch on the reward service."""

    __name__ = "salmon_rm"

    def __init__(self, client: AsyncSalmonClient, timeline: SetTimeline, selector: PrincipleSelector,
                 shaping: ShapingConfig, *, run_id: str, writer: RolloutWriter | None = None,
                 eos_token_ids: Sequence[int] = (), normalizer: RunningNormalizer | None = None,
                 resolve_set: Callable[[str], Awaitable[PrincipleSet]] | None = None, mode: str = "pointwise"):
        self.client = client
        self.mode = mode  # the service's scoring mode, sent per request (X-Score-Mode)
        self.timeline = timeline
        self.selector = selector
        self.shaping = shaping
        self.run_id = run_id
        self.writer = writer
        self.eos_token_ids = list(eos_token_ids)
        self.normalizer = normalizer or RunningNormalizer()
        self.resolve_set = resolve_set  # control-file switches: source -> loaded and registered set
        self.wait_by_step: dict[int, float] = defaultdict(float)
        self.requests_by_step: dict[int, int] = defaultdict(int)
        self.set_by_step: dict[int, str] = {}

    async def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                       trainer_state: Any = None, log_metric: Callable[[str, float], None] | None = None,
                       log_extra: Callable[[str, list], None] | None = None,
                       prompt_id: list[str] | None = None, prompt_type: list[str] | None = None,
                       **_: Any) -> list[float]:
        step = int(getattr(trainer_state, "global_step", 0) or 0)
        n = len(completions)
        # Without ids (a user's own dataset), a prompt's text names it: its group stays one group, with
        # one principle selection, as GRPO's group-relative advantage needs.
        ids = prompt_id or [prompt_key(p) for p in prompts]
        types = prompt_type or [None] * n
        pset = self.timeline.at_step(step)
        source = self.timeline.poll_control()
        if source is not None:
            if self.resolve_set is None:
                raise RuntimeError("principles.control_file is set but the reward has no set resolver")
            pset = await self.resolve_set(source)
            self.timeline.switch(step, pset, "control_file")
        texts = [completion_text(c) for c in completions]

        # One group per prompt, in first-seen order; TRL puts a prompt's generations side by side,
        # but nothing here depends on it.
        order: dict[str, list[int]] = {}
        for i, pid in enumerate(ids):
            order.setdefault(pid, []).append(i)
        selections = {pid: self.selector.select(pset, step=step, prompt_id=pid, prompt_type=types[rows[0]])
                      for pid, rows in order.items()}
        groups = []
        for pid, rows in order.items():
            sel = selections[pid]
            groups.append(Group(prompt=_service_prompt(prompts[rows[0]]), responses=[texts[i] for i in rows],
                                principles=principle_payload(sel) if sel.inline else None,
                                principle_set=sel.set_ref, key=sel.key))

        t0 = time.monotonic()
        headers = {"X-Salmon-Run": self.run_id, "X-Salmon-Step": str(step)}
        if self.mode != "pointwise":
            headers["X-Score-Mode"] = self.mode  # listwise: each prompt's group is one list
        scored = await self.client.score_groups(groups, headers=headers)
        wait = time.monotonic() - t0
        self.wait_by_step[step] += wait
        self.requests_by_step[step] += self.client.last.requests
        self.set_by_step[step] = pset.ref

        raw = [0.0] * n
        for (_pid, rows), scores in zip(order.items(), scored, strict=True):
            for i, s in zip(rows, scores, strict=True):
                raw[i] = s
        rm = scale_scores(raw, self.shaping, self.normalizer)
        shaped = shaping_terms(completion_ids, types, self.eos_token_ids, self.shaping)

        if log_metric is not None:
            log_metric("reward_service/wait_s", wait)
            log_metric("reward_service/requests", float(self.client.last.requests))
            log_metric("reward_service/retries", float(self.client.last.retries))
            log_metric("reward_service/raw_mean", sum(raw) / max(n, 1))
        if log_extra is not None:
            log_extra("principle_set", [pset.ref] * n)
            log_extra("principles", [",".join(selections[pid].names) for pid in ids])

        if self.writer is not None:
            version = policy_version(self.run_id, step)
            records = [{
                "run_id": self.run_id, "step": step, "prompt_id": ids[i], "prompt": _service_prompt(prompts[i]),
                "type": types[i], "completion": texts[i], "reward": raw[i],
                "reward_total": rm[i] + shaped[i], "principle_set": pset.ref,
                "principle_set_hash": pset.hash, "principles": selections[ids[i]].names,
                "policy_version": version,
            } for i in range(n)]
            self.writer.write_step(step, records)
        return rm


def _service_prompt(prompt: Any) -> Any:
    """The prompt as the service takes it: text, or the chat messages without TRL's extras."""
    if isinstance(prompt, str):
        return prompt
    return [{"role": m["role"], "content": m["content"]} for m in prompt]
