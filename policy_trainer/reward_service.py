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
from policy_trainer.rollouts import RolloutWriter
from policy_trainer.shaping import RunningNormalizer
from principles.schema import NAME_RE, PrincipleSet, PrincipleSetError, load_principle_set
from salmon.errors import Unavailable, UserError
from salmon_client.client import AsyncSalmonClient, RetryPolicy, RewardServiceError


class TrainingAborted(Unavailable):
    """The run stopped because the reward service stayed unreachable; a checkpoint was saved."""

    def __init__(self, message: str, *, url: str, checkpoint: Path | None, global_step: int):
        super().__init__(message)
        self.url, self.checkpoint, self.global_step = url, checkpoint, global_step


def make_client(cfg: RunConfig, render_query=None) -> AsyncSalmonClient:
    r = cfg.reward
    return AsyncSalmonClient(
        r.url, protocol=r.protocol, api_key_env=r.api_key_env, admin_key_env=r.admin_key_env,
        connect_timeout_s=r.connect_timeout_s, read_timeout_s=r.read_timeout_s, max_connections=r.max_connections,
        max_concurrent_requests=r.max_concurrent_requests, max_items=r.max_items_per_request,
        retry=RetryPolicy(**r.retry.model_dump()), render_query=render_query)


class SetResolver:
    """Set source (shipped name, YAML path, or a name registered on the service) -> registered set."""

    def __init__(self, cfg: RunConfig, client: AsyncSalmonClient):
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


async def _resolve_sets(cfg: RunConfig, client: AsyncSalmonClient) -> tuple[SetTimeline, PrincipleSelector]:
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

    return _render_with(load_tokenizer(model_dir))


def _render_with(tok: Any):
    def render_query(prompt: Any, response: str) -> str:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if response:
            return tok.apply_chat_template([*msgs, {"role": "assistant", "content": response}], tokenize=False)
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    return render_query


@dataclass
class RewardService:
    """The client, the principle-set timeline and the reward callables of one run."""

    client: AsyncSalmonClient
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
    return _connect(cfg, run_id, _render_query(model_dir) if cfg.reward.protocol == "openrlhf" else None)


def _connect(cfg: RunConfig, run_id: str, render_query: Any) -> RewardService:
    client = make_client(cfg, render_query)
    try:
        timeline, selector = asyncio.run(_resolve_sets(cfg, client))
    except RewardServiceError as e:
        if not e.retryable:  # a wrong key, path or set: the user fixes the config
            raise UserError(f"reward.url: {e}") from None
        raise TrainingAborted(f"{e}; no step had run", url=e.url, checkpoint=None, global_step=0) from e
    normalizer = RunningNormalizer()
    writer = RolloutWriter(cfg.output.rollouts_dir, run_id) if cfg.output.rollouts_dir else None
    score = ServiceReward(client, timeline, selector, cfg.shaping, run_id=run_id, writer=writer,
                          normalizer=normalizer, resolve_set=SetResolver(cfg, client), mode=cfg.reward.mode)
    shaping = ShapingReward(cfg.shaping) if cfg.shaping.length_bonus.enabled or cfg.shaping.unfinished_penalty \
        else None
    return RewardService(client, timeline, normalizer, writer, score, shaping)


def reward_funcs(config: RunConfig | str | Path | dict[str, Any] | None = None, *, url: str | None = None,
                 principle_set: str | None = None, tokenizer: Any = None, run_id: str | None = None) -> list[Any]:
    """TRL reward functions scored by the salmon service, for a GRPOTrainer (or RLOOTrainer) of your own.

    The same callables ``salmon train`` gives TRL: the service's score (async; TRL awaits it on its
    own loop), then SALMON's shaping terms when the config turns any on. ::

        from policy_trainer import reward_funcs
        trainer = GRPOTrainer(model=..., args=GRPOConfig(...), train_dataset=ds,
                              reward_funcs=reward_funcs(url="http://127.0.0.1:8000", principle_set="concise"))

    ``config``: a run config (``RunConfig``, a YAML path, or a dict) whose ``reward``, ``principles``,
    ``shaping`` and ``output`` sections apply (every field as documented in policy_trainer/config.py:
    per-prompt selection ``select_k``, an ``intervention`` set, a ``schedule`` of switches, retries);
    ``url`` (default: the config's, else ``$SALMON_URL``, else http://127.0.0.1:8000) and
    ``principle_set`` (a shipped name, a YAML path, or a name registered on the service) override it;
    the API key is ``$SALMON_API_KEY`` (``reward.api_key_env``). Rollout shards are written only when
    the config names ``output.rollouts_dir``.
    ``tokenizer``: the policy's; gives the EOS ids of the shaping terms, and the chat template of
    ``reward.protocol: openrlhf``. A dataset column ``prompt_id`` groups completions by prompt (else
    the prompt itself does); ``prompt_type`` picks SALMON's per-type boosts.

    Connects at once: a wrong URL, key or set raises UserError here, not at the first step; an
    unreachable service raises TrainingAborted after the retry budget.
    """
    from policy_trainer.config import set_dotted
    from salmon.config import load_yaml, validate_config

    if isinstance(config, RunConfig):
        data: Any = config.model_dump()
    elif isinstance(config, dict):
        data = {**config, "output": {"rollouts_dir": None, **(config.get("output") or {})}}
    elif config is None:
        data = {"output": {"rollouts_dir": None}}
    else:
        data = load_yaml(config)
    if isinstance(data, dict):
        url = url or (None if (data.get("reward") or {}).get("url") else os.environ.get("SALMON_URL"))
        if url:
            set_dotted(data, "reward.url", url)
        if principle_set is not None:
            set_dotted(data, "principles.set", principle_set)
    cfg = validate_config(RunConfig, data, str(config) if isinstance(config, str | Path) else "reward_funcs")
    if cfg.reward.protocol == "openrlhf" and tokenizer is None:
        raise UserError("reward.protocol openrlhf: pass tokenizer= (the policy's) to render its chat template")
    service = _connect(cfg, run_id or cfg.output.run_id or "trl",
                       _render_with(tokenizer) if cfg.reward.protocol == "openrlhf" else None)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is not None:
        service.score.eos_token_ids = [eos]
        if service.shaping is not None:
            service.shaping.eos_token_ids = [eos]
    return service.reward_funcs
