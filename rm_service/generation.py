"""POST /v1/generate: RAIN search (or plain sampling) through the service's own model and scorer.

The stages of scoring, then a search: limits → principles (inline or a registered set) → render the
prompt off the event loop (a RenderError is a 422 naming ``prompt``) → the search (rm_core.rain) on
its own thread → a JSON response, or server-sent events.

How generation shares the machine with scoring, and why it never blocks the batcher:

- The search runs on a thread of its own. Its *value* calls go through the service's batcher as
  ordinary prepared items, so they queue with scoring requests, are batched with them and are
  counted in the same metrics; a scoring request waits at most one batch behind a generation.
- Its *sampling* forwards run on the generation thread against the same weights without the
  scorer's lock: inference-mode forwards change no state (rm_core.rain.CausalLMSampler).
- At most ``generate_concurrency`` generations run at once (a semaphore, never waited on): one
  more is a 429 with Retry-After, like a full scoring queue.
- A client that drops a stream cancels its search at the next iteration.

With the contrastive or probe scorer the sampler uses the scorer's own causal LM; with a trained or
rule scorer, a causal LM of the scorer's base model (or the ``model`` setting) is loaded once, on the
first generation.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError

from principles.schema import Principle
from rm_core.rain import (
    CausalLMSampler,
    GenerationResult,
    RainConfig,
    generate,
    generation_context,
    sampler_for,
)
from rm_core.render import Prompt, Renderer, RenderError
from rm_core.scorers import Scorer
from rm_service.errors import (
    InvalidRequest,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ScoringFailed,
    ServiceError,
    error_body,
)
from rm_service.protocol import GenerateRequest, GenerateResponse, GenerateStats, GenerateUsage

if TYPE_CHECKING:
    from rm_service.serving import ScoreService


RESPONSE_MARGIN = 16  # response tokens kept free for the closing turn and re-tokenization


@dataclass
class GenerationJob:
    """A validated request, ready to run: its search, model side and value function."""

    req: GenerateRequest
    config: RainConfig
    scorer: Scorer
    sampler: CausalLMSampler
    context: tuple[int, ...]
    principles: list[Principle]
    prompt: Prompt
    set_hash: str
    set_ref: str
    value: Callable[[list[str]], list[float]]

    def run(self, on_commit: Callable[[str], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> GenerationResult:
        return generate(self.req.search, self.sampler, self.value, self.context, self.config,
                        on_commit=on_commit, should_stop=should_stop)

    def response(self, result: GenerationResult) -> GenerateResponse:
        st = result.stats
        return GenerateResponse(
            text=result.text, search=self.req.search, finish_reason=st.stopped,
            stats=GenerateStats(**st.to_dict()), model_version=self.scorer.version, scorer=self.scorer.kind,
            principle_set_hash=self.set_hash, principle_set=self.set_ref,
            usage=GenerateUsage(prompt_tokens=len(self.context), completion_tokens=len(result.tokens)))


def sse(event: str, data: dict) -> bytes:
    """One server-sent event: its name and one line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class GenerationService:
    """The /v1/generate pipeline over a :class:`~rm_service.serving.ScoreService` (see the module docstring)."""

    def __init__(self, service: ScoreService):
        self.service = service
        self.settings = service.settings
        self._slots = threading.BoundedSemaphore(self.settings.generate_concurrency)
        self._lock = threading.Lock()
        self._samplers: dict[str, tuple[CausalLMSampler, Renderer]] = {}

    # -- the model side ---------------------------------------------------------------------------
    def sampler_for(self, scorer: Scorer) -> tuple[CausalLMSampler, Renderer]:
        """The sampler and renderer generation uses with ``scorer`` (built once per scorer version)."""
        with self._lock:
            hit = self._samplers.get(scorer.version)
            if hit is not None:
                return hit
            st = self.settings
            built = sampler_for(scorer, st.model, self.service.models.options, st.max_prompt_tokens,
                                st.max_response_tokens)
            self._samplers = {scorer.version: built}  # one version at a time: a reload retires the old one
            return built

    # -- validation -------------------------------------------------------------------------------
    @property
    def max_new_tokens(self) -> int:
        """Tokens a generation may ask for: every candidate must stay scorable, and the scorer's response
        holds the closing turn's tokens too (a text re-tokenizes to about its tokens, rarely a few more)."""
        st = self.settings
        return max(1, min(st.generate_max_new_tokens, st.max_response_tokens - RESPONSE_MARGIN))

    def config(self, req: GenerateRequest) -> RainConfig:
        st = self.settings
        limit = self.max_new_tokens
        if req.max_new_tokens is not None and req.max_new_tokens > limit:
            raise InvalidRequest(f"max_new_tokens {req.max_new_tokens} is over this server's limit of {limit} "
                                 "(generate_max_new_tokens, and the scorer's max_response_tokens less the "
                                 "closing turn)", param="max_new_tokens")
        if req.time_budget_s is not None and req.time_budget_s > st.generate_max_time_s:
            raise InvalidRequest(f"time_budget_s {req.time_budget_s:g} is over this server's limit of "
                                 f"{st.generate_max_time_s:g} s (generate_max_time_s)", param="time_budget_s")
        opts = req.options.model_dump(exclude_none=True) if req.options else {}
        if opts.get("max_expansions", 0) > st.generate_max_expansions:
            raise InvalidRequest(f"options.max_expansions {opts['max_expansions']} is over this server's limit "
                                 f"of {st.generate_max_expansions} (generate_max_expansions)",
                                 param="options.max_expansions")
        top = {k: getattr(req, k) for k in ("max_new_tokens", "time_budget_s", "temperature", "top_p", "seed")
               if getattr(req, k) is not None}
        base = RainConfig()
        limits = {"max_new_tokens": min(base.max_new_tokens, limit),
                  "time_budget_s": min(base.time_budget_s, st.generate_max_time_s),
                  "max_expansions": min(base.max_expansions, st.generate_max_expansions)}
        try:
            return RainConfig(**{**limits, **opts, **top})
        except ValidationError as e:
            first = e.errors()[0]
            msg = first.get("msg", "invalid").removeprefix("Value error, ")
            raise InvalidRequest(f"options: {msg}", param="options") from None

    async def prepare(self, req: GenerateRequest) -> GenerationJob:
        """Every check of the request (each a 4xx before any byte is sent), then a slot to run in."""
        svc = self.service
        if isinstance(req.prompt, list) and len(req.prompt) > self.settings.max_messages:
            raise PayloadTooLarge(f"prompt has {len(req.prompt)} messages; the limit is {self.settings.max_messages}",
                                  param="prompt")
        config = self.config(req)
        pset = svc.principle_set_for(req)
        principles = list(pset.principles)
        unknown = [n for n in req.negate if n not in {p.name for p in principles}]
        if unknown:
            raise InvalidRequest(f"negate names {unknown}, which are not in the principles "
                                 f"{[p.name for p in principles]}", param="negate")
        scorer = svc.scorer()
        prompt = req.prompt if isinstance(req.prompt, str) else [m.model_dump() for m in req.prompt]

        def build() -> tuple[CausalLMSampler, tuple[int, ...]]:
            sampler, renderer = self.sampler_for(scorer)
            try:
                # The scorer must take this request (e.g. the contrastive scorer needs a negative
                # definition): one empty response prepared now fails here, not mid-search.
                scorer.prepare(principles, prompt, "", req.negate, req.truncate)
                ctx = generation_context(renderer, principles, prompt, req.negate, req.truncate,
                                         config.principles_in_context)
            except RenderError as e:
                raise InvalidRequest(f"prompt: {e}", param="prompt") from None
            return sampler, ctx

        sampler, context = await asyncio.to_thread(build)
        if not self._slots.acquire(blocking=False):
            raise Overloaded(f"{self.settings.generate_concurrency} generation(s) already running "
                             "(generate_concurrency); retry after the Retry-After delay",
                             retry_after_s=config.time_budget_s / 4)
        return GenerationJob(req, config, scorer, sampler, context, principles, prompt, pset.hash, pset.ref,
                             self.value_fn(scorer, principles, prompt, req))

    def value_fn(self, scorer: Scorer, principles: list[Principle], prompt: Prompt,
                 req: GenerateRequest) -> Callable[[list[str]], list[float]]:
        """Values of partial responses, through the batcher beside scoring requests."""
        timeout = self.settings.request_timeout_s

        def value(texts: list[str]) -> list[float]:
            try:
                prepared = [scorer.prepare(principles, prompt, t, req.negate, req.truncate) for t in texts]
            except RenderError as e:
                raise ScoringFailed(f"a candidate response could not be scored: {e}") from None
            fut = self.service.batcher.submit(prepared)  # Overloaded (429) when the queue is full
            try:
                return fut.result(timeout=timeout).scores
            except TimeoutError:
                raise NotReady(f"a value call took longer than {timeout:.0f} s; the service is overloaded, "
                               "retry later", retry_after_s=10) from None
            except Exception as e:
                raise ScoringFailed(f"the model failed on a value call: {type(e).__name__}: {e}") from e

        return value

    # -- running ------------------------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        job = await self.prepare(req)
        try:
            result = await asyncio.to_thread(job.run)
        except ServiceError:
            raise
        except Exception as e:
            raise ScoringFailed(f"generation failed: {type(e).__name__}: {e}") from e
        finally:
            self._slots.release()
        return job.response(result)

    async def stream(self, req: GenerateRequest) -> AsyncIterator[bytes]:
        """Validate now (errors are ordinary 4xx responses), then the events: ``segment`` per committed
        piece of text, then ``done`` with the whole response, or ``error`` with the error body."""
        job = await self.prepare(req)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        cancel = threading.Event()

        def put(kind: str, payload: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

        def work() -> None:
            try:
                put("done", job.run(lambda text: put("segment", text), cancel.is_set))
            except BaseException as e:  # reported as an error event: the status line is already sent
                put("error", e)
            finally:
                self._slots.release()

        threading.Thread(target=work, name="salmon-generate", daemon=True).start()

        async def events() -> AsyncIterator[bytes]:
            index = 0
            try:
                while True:
                    kind, payload = await queue.get()
                    if kind == "segment":
                        yield sse("segment", {"index": index, "text": payload})
                        index += 1
                    elif kind == "done":
                        yield sse("done", job.response(payload).model_dump())
                        return
                    else:
                        e = payload
                        if isinstance(e, ServiceError):
                            body = error_body(e.status, e.type, e.message, e.param)
                        else:
                            body = error_body(500, "scoring_failed", f"generation failed: {type(e).__name__}: {e}")
                        yield sse("error", body)
                        return
            finally:
                cancel.set()  # a client gone mid-stream stops the search at its next iteration

        return events()
