"""The reward service as a run sees it, set up only for a method that uses it (``Method.uses_reward_service``).

``connect`` talks to the service before any model is loaded (limits, principle sets), so a wrong
URL, key or set name fails in seconds with one line; it registers the run's principle sets (start,
scheduled, intervention), refers to each as ``name@hash`` from then on, and builds the reward
callables a trainer calls (policy_trainer.rewards): the service's score and SALMON's shaping terms.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy_trainer.config import RunConfig
from policy_trainer.principles_select import PrincipleSelector, SetTimeline
from policy_trainer.rewards import ServiceReward, ShapingReward
from policy_trainer.rm_client import RetryPolicy, RewardClient, RewardServiceError
from policy_trainer.rollouts import RolloutWriter
from policy_trainer.shaping import RunningNormalizer
from principles.schema import NAME_RE, PrincipleSet, PrincipleSetError, load_principle_set
from salmon.errors import Unavailable, UserError


class TrainingAborted(Unavailable):
    """The run stopped because the reward service stayed unreachable; a checkpoint was saved."""

    def __init__(self, message: str, *, url: str, checkpoint: Path | None, global_step: int):
        super().__init__(message)
        self.url, self.checkpoint, self.global_step = url, checkpoint, global_step


def make_client(cfg: RunConfig, render_query=None) -> RewardClient:
    r = cfg.reward
    return RewardClient(
        r.url, protocol=r.protocol, api_key=os.environ.get(r.api_key_env) or None,
        admin_key=os.environ.get(r.admin_key_env) or None, connect_timeout_s=r.connect_timeout_s,
        read_timeout_s=r.read_timeout_s, max_connections=r.max_connections,
        max_concurrent_requests=r.max_concurrent_requests, max_items=r.max_items_per_request,
        retry=RetryPolicy.from_config(r.retry), render_query=render_query)


class SetResolver:
    """Set source (shipped name, YAML path, or a name registered on the service) -> registered set."""

    def __init__(self, cfg: RunConfig, client: RewardClient):
        self.cfg, self.client = cfg, client

    async def __call__(self, source: str, field_name: str = "principles.set") -> PrincipleSet:
        try:
            pset = load_principle_set(source)
        except PrincipleSetError as e:
            bare = NAME_RE.match(source) and not Path(source).suffix and "/" not in source
            if not (bare and self.cfg.reward.protocol == "salmon"):
                raise UserError(f"{field_name}: {e}") from None
            try:
                pset = await self.client.fetch_set(source)
            except RewardServiceError as e2:
                if e2.status == 404:
                    raise UserError(f"{field_name}: {e}; nor is {source!r} registered on {self.cfg.reward.url}") from None
                raise
        if self.cfg.reward.register_sets and self.cfg.reward.protocol == "salmon":
            await self.client.register_set(pset)
        return pset


async def _resolve_sets(cfg: RunConfig, client: RewardClient) -> tuple[SetTimeline, PrincipleSelector]:
    resolve = SetResolver(cfg, client)
    try:
        await client.limits()
        start = await resolve(cfg.principles.set)
        schedule = [(s.step, await resolve(s.set, f"principles.schedule.{i}.set"))
                    for i, s in enumerate(cfg.principles.schedule)]
        intervention = (await resolve(cfg.principles.intervention, "principles.intervention")
                        if cfg.principles.intervention else None)
    finally:
        await client.aclose()
    p = cfg.principles
    selector = PrincipleSelector(k=p.select_k, intervention=intervention, type_boost=p.type_boost,
                                 type_tags=p.type_tags, seed=p.seed)
    return SetTimeline(start, schedule, control_file=p.control_file), selector


def _render_query(model_dir: Path):
    """openrlhf protocol: (prompt, response) -> the policy's chat-templated text."""
    from salmon.modeling import load_tokenizer

    tok = load_tokenizer(model_dir)

    def render_query(prompt: Any, response: str) -> str:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if response:
            return tok.apply_chat_template([*msgs, {"role": "assistant", "content": response}], tokenize=False)
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    return render_query


@dataclass
class RewardService:
    """The client, the principle-set timeline and the reward callables of one run."""

    client: RewardClient
    timeline: SetTimeline
    normalizer: RunningNormalizer
    writer: RolloutWriter | None
    score: ServiceReward
    shaping: ShapingReward | None

    @property
    def reward_funcs(self) -> list[Any]:
        """TRL's reward functions: the service's score, then the shaping terms when any is on."""
        return [self.score] if self.shaping is None else [self.score, self.shaping]

    def state_dict(self) -> dict[str, Any]:
        return {"timeline": self.timeline.state_dict(), "normalizer": self.normalizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        self.timeline.load_state_dict(state.get("timeline", {}), step)
        self.normalizer.load_state_dict(state.get("normalizer", self.normalizer.state_dict()))

    def bind(self, trainer: Any) -> None:
        """Take from the built trainer what the reward callables need: EOS ids, the process rank."""
        eos = list(getattr(trainer, "eos_token_ids", None) or [trainer.processing_class.eos_token_id])
        self.score.eos_token_ids = eos
        if self.shaping is not None:
            self.shaping.eos_token_ids = eos
        if self.writer is not None:
            self.writer.rank = trainer.accelerator.process_index

    def close(self, trainer: Any) -> None:
        """Close the client on the event loop it lives on (the trainer's, while it runs)."""
        loop = getattr(trainer, "async_loop", None)
        if loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(self.client.aclose(), loop).result(timeout=10)

    def events(self) -> list[dict[str, Any]]:
        return [e.as_dict() for e in self.timeline.events]


def connect(cfg: RunConfig, model_dir: Path, run_id: str) -> RewardService:
    """Check the service, register the run's sets, build the reward callables. Raises UserError for a
    wrong key, path or set, TrainingAborted when the service cannot be reached at all."""
    client = make_client(cfg, _render_query(model_dir) if cfg.reward.protocol == "openrlhf" else None)
    try:
        timeline, selector = asyncio.run(_resolve_sets(cfg, client))
    except RewardServiceError as e:
        if not e.retryable:  # a wrong key, path or set: the user fixes the config
            raise UserError(f"reward.url: {e}") from None
        raise TrainingAborted(f"{e}; no step had run", url=e.url, checkpoint=None, global_step=0) from e
    normalizer = RunningNormalizer()
    writer = RolloutWriter(cfg.output.rollouts_dir, run_id) if cfg.output.rollouts_dir else None
    score = ServiceReward(client, timeline, selector, cfg.shaping, run_id=run_id, writer=writer,
                          normalizer=normalizer, resolve_set=SetResolver(cfg, client))
    shaping = ShapingReward(cfg.shaping) if cfg.shaping.length_bonus.enabled or cfg.shaping.unfinished_penalty \
        else None
    return RewardService(client, timeline, normalizer, writer, score, shaping)
