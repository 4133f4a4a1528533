"""Serving logic, in plain stages: validate → resolve principles → render → queue → batch → score.

No FastAPI here: routes (api.py) call these objects, which return protocol objects or raise typed
errors (errors.py). Rendering (tokenization) runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import struct
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from principles.schema import (
    Principle,
    PrincipleSet,
    PrincipleSetError,
    RubricScale,
    load_builtin_sets,
    load_principle_set,
    parse_principle_set,
)
from rm_core.modes import Plan, plan_listwise, plan_rubric
from rm_core.prefix_cache import PrefixCache
from rm_core.registry import Registry, RegistryError
from rm_core.render import PROMPT_FORMAT_VERSION, RenderError
from rm_core.scorer_table import ScorerOptions, build_scorer, resolve_kind
from rm_core.scorers import Prepared, Scorer
from rm_service.batcher import Batcher, JobResult
from rm_service.errors import Conflict, InvalidRequest, NotFound, NotReady, PayloadTooLarge, ScoringFailed
from rm_service.generation import GenerationService
from rm_service.metrics import Metrics
from rm_service.protocol import (
    ClassificationData,
    ClassificationResponse,
    GenerateRequest,
    InlinePrinciple,
    ModelInfo,
    PoolingData,
    PoolingInput,
    PoolingRequest,
    PoolingResponse,
    PoolingUsage,
    PrincipleSetInfo,
    PrincipleSetList,
    PromptTokensDetails,
    ReloadResponse,
    RewardRequest,
    RewardResponse,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    Usage,
)
from rm_service.settings import ServiceSettings
from salmon.modeling import ModelOptions

log = logging.getLogger("salmon.rm_service")
MAX_SET_HISTORY = 256


class PrincipleSetStore:
    """Registered principle sets: name → current content, and name@hash → exact content.

    Replacing a set under a name keeps the old content reachable by its ``name@hash`` (bounded
    history), so an RL run pinned to a hash keeps its rewards while another run hot-swaps.
    """

    def __init__(self, default: str, extra_dir: Path | None = None):
        self._lock = threading.Lock()
        self._current: dict[str, PrincipleSet] = dict(load_builtin_sets())
        self._by_ref: OrderedDict[str, PrincipleSet] = OrderedDict()
        # Errors name the setting they came from, so a bad config says which field to fix.
        if extra_dir is not None:
            if not Path(extra_dir).is_dir():
                raise PrincipleSetError(f"field 'principle_sets_dir': {extra_dir} is not a directory")
            for f in sorted(Path(extra_dir).glob("*.y*ml")):
                try:
                    s = load_principle_set(f)
                except PrincipleSetError as e:
                    raise PrincipleSetError(f"field 'principle_sets_dir': {e}") from None
                self._current[s.name] = s
        if default not in self._current:
            try:
                s = load_principle_set(default)  # a path to a YAML file
            except PrincipleSetError as e:
                raise PrincipleSetError(f"field 'default_principle_set': {e}") from None
            self._current[s.name] = s
            default = s.name
        self.default = default
        for s in self._current.values():
            self._by_ref[s.ref] = s

    def info(self, s: PrincipleSet) -> PrincipleSetInfo:
        return PrincipleSetInfo(name=s.name, hash=s.hash, ref=s.ref, description=s.description,
                                num_principles=len(s.principles), is_default=s.name == self.default)

    def list(self) -> PrincipleSetList:
        with self._lock:
            sets = sorted(self._current.values(), key=lambda s: s.name)
        return PrincipleSetList(principle_sets=[self.info(s) for s in sets], default=self.default)

    def resolve(self, spec: str | None) -> PrincipleSet:
        spec = spec or self.default
        with self._lock:
            if "@" in spec:
                s = self._by_ref.get(spec)
                if s is None:
                    name = spec.split("@", 1)[0]
                    hint = (f"the current content of {name!r} is {self._current[name].ref}" if name in self._current
                            else f"no set named {name!r} is registered")
                    raise NotFound(f"principle set {spec!r} is not known ({hint})", param="principle_set")
                return s
            s = self._current.get(spec)
        if s is None:
            raise NotFound(f"principle set {spec!r} is not registered; GET /v1/principle-sets lists them, "
                           "PUT /v1/principle-sets/{name} registers one", param="principle_set")
        return s

    def put(self, name: str, body: object) -> tuple[PrincipleSetInfo, bool]:
        if isinstance(body, dict) and "name" not in body:
            body = {**body, "name": name}
        try:
            s = parse_principle_set(body, where="request body")
        except PrincipleSetError as e:
            raise InvalidRequest(str(e), param="body") from None
        if s.name != name:
            raise InvalidRequest(f"the body names the set {s.name!r} but the URL says {name!r}; make them equal",
                                 param="name")
        with self._lock:
            created = name not in self._current
            self._current[name] = s
            self._by_ref[s.ref] = s
            self._by_ref.move_to_end(s.ref)
            while len(self._by_ref) > MAX_SET_HISTORY:
                self._by_ref.popitem(last=False)
        log.info("principle set %s registered (%s)", s.ref, "new" if created else "replaced")
        return self.info(s), created

    def delete(self, name: str) -> None:
        with self._lock:
            if name == self.default:
                raise Conflict(f"{name!r} is the default principle set and cannot be deleted", param="name")
            if self._current.pop(name, None) is None:
                raise NotFound(f"principle set {name!r} is not registered", param="name")


class ModelManager:
    """Holds the current scorer; loads new versions beside the old and swaps atomically."""

    def __init__(self, settings: ServiceSettings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.prefix_cache = PrefixCache(settings.prefix_cache_bytes, enabled=settings.prefix_cache,
                                        attention=settings.prefix_attention)
        self.scorer: Scorer | None = None
        self.load_error: str | None = None
        self.last_reload_error: str | None = None
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def options(self) -> ModelOptions:
        s = self.settings
        return ModelOptions(dtype=s.dtype, attention=s.attention, device=s.device)

    def _kind(self) -> str:
        s = self.settings
        return resolve_kind(s.scorer, s.model, s.registry)

    def _common(self) -> dict:
        s = self.settings
        return dict(max_batch_tokens=s.max_batch_tokens, max_padding=s.max_padding, max_prompt_tokens=s.max_prompt_tokens,
                    max_response_tokens=s.max_response_tokens, prefix_cache=self.prefix_cache)

    def build(self, version: str | None = None) -> Scorer:
        s = self.settings
        kind = "trained" if version else self._kind()  # a named version is always a registry version
        opts = ScorerOptions(model=s.model, options=self.options, registry=s.registry, version=version,
                             contrast=s.contrast, contrast_adapter=s.contrast_adapter,
                             rule_pattern=s.rule_pattern,
                             rule_length_penalty=s.rule_length_penalty)
        return build_scorer(kind, opts, self._common())

    def load_initial(self) -> None:
        t0 = time.perf_counter()
        try:
            self.scorer = self.build()
        except Exception as e:  # reported by /readyz and the log; the process stays up to say why
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("model load failed: %s", self.load_error)
            return
        log.info("scorer %s (%s) ready in %.1f s", self.scorer.version, self.scorer.kind, time.perf_counter() - t0)
        # With scorer auto (or trained), a version published later is picked up: the service can start
        # zero-shot on an empty registry and switch to the first trained version without a restart.
        if self.settings.registry is not None and self.settings.watch_registry and self.settings.scorer in {"auto", "trained"}:
            self._watcher = threading.Thread(target=self._watch, name="salmon-registry-watch", daemon=True)
            self._watcher.start()

    def reload(self, version: str | None = None) -> ReloadResponse:
        with self._reload_lock:
            old = self.scorer
            previous = old.version if old else "none"
            try:
                if self.settings.registry is None:
                    raise RegistryError("no registry is configured; start the service with --registry DIR")
                target = version or Registry(self.settings.registry).current()
                if target is None:
                    raise RegistryError(f"registry {self.settings.registry} has no CURRENT version")
                if old is not None and old.version == target and version is None:
                    return ReloadResponse(reloaded=False, model_version=target, previous_version=previous,
                                          message=f"already serving {target}")
                new = self.build(target)
            except Exception as e:
                self.last_reload_error = f"{type(e).__name__}: {e}"
                self.metrics.reloads.labels("failed").inc()
                log.error("reload failed, still serving %s: %s", previous, self.last_reload_error)
                return ReloadResponse(reloaded=False, model_version=previous, previous_version=previous,
                                      message=f"reload failed; still serving {previous}: {self.last_reload_error}")
            self.scorer = new  # atomic swap: requests already prepared keep the old scorer object
            self.last_reload_error = None
            self.metrics.reloads.labels("ok").inc()
            if old is not None and old.version != new.version and self.prefix_cache is not None:
                self.prefix_cache.invalidate(old.version)
            log.info("now serving %s (was %s)", new.version, previous)
            return ReloadResponse(reloaded=True, model_version=new.version, previous_version=previous,
                                  message=f"now serving {new.version}")

    def _watch(self) -> None:
        reg = Registry(self.settings.registry)
        failed_for: str | None = None
        while not self._stop.wait(self.settings.watch_interval_s):
            try:
                cur = reg.current()
            except OSError:
                continue
            if cur and self.scorer is not None and cur != self.scorer.version and cur != failed_for:
                r = self.reload(None)
                failed_for = None if r.reloaded else cur  # don't retry a broken version every tick

    def stop(self) -> None:
        self._stop.set()


class ScoreService:
    """The request pipeline shared by /v1/score, /get_reward and vLLM's /classify and /pooling."""

    def __init__(self, settings: ServiceSettings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.sets = PrincipleSetStore(settings.default_principle_set, settings.principle_sets_dir)
        self.models = ModelManager(settings, self.metrics)
        self.batcher = Batcher(settings.max_batch_tokens, settings.max_queue_items, settings.batch_wait_ms,
                               self.metrics)
        self.generation = GenerationService(self)  # POST /v1/generate: its value calls use this batcher

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.batcher.start()
        self.models.load_initial()

    def stop(self) -> None:
        self.models.stop()
        self.batcher.stop()

    @property
    def ready(self) -> bool:
        return self.models.scorer is not None

    def scorer(self) -> Scorer:
        s = self.models.scorer
        if s is None:
            if self.models.load_error:
                raise NotReady(f"the model failed to load: {self.models.load_error}", retry_after_s=30)
            raise NotReady("the model is still loading", retry_after_s=5)
        return s

    # -- stages -------------------------------------------------------------------------------
    def _principles(self, req: ScoreRequest) -> tuple[list[Principle], str, str]:
        """(principles, set hash, set ref) for a request: inline wins over a named set."""
        s = self._set(req)
        return list(s.principles), s.hash, s.ref

    def principle_set_for(self, req: ScoreRequest | GenerateRequest) -> PrincipleSet:
        """The set a request names: its inline principles (limits checked), else a registered set."""
        return self._set(req)

    def _set(self, req: ScoreRequest | GenerateRequest) -> PrincipleSet:
        if req.principles is not None:
            if len(req.principles) > self.settings.max_principles:
                raise PayloadTooLarge(f"{len(req.principles)} inline principles; the limit is "
                                      f"{self.settings.max_principles}", param="principles")
            plist = []
            for i, p in enumerate(req.principles):
                item = InlinePrinciple(name=f"p{i + 1}", definition=p) if isinstance(p, str) else p
                plist.append(item.model_dump())
            try:
                s = parse_principle_set({"name": "inline", "principles": plist}, where="inline principles")
            except PrincipleSetError as e:
                raise InvalidRequest(str(e), param="principles") from None
        else:
            s = self.sets.resolve(req.principle_set)
        return s

    def _check_limits(self, req: ScoreRequest) -> None:
        st = self.settings
        if len(req.items) > st.max_items:
            raise PayloadTooLarge(f"{len(req.items)} items in one request; the limit is {st.max_items}. "
                                  "Split the request", param="items")
        for i, it in enumerate(req.items):
            if isinstance(it.prompt, list) and len(it.prompt) > st.max_messages:
                raise PayloadTooLarge(f"items[{i}].prompt has {len(it.prompt)} messages; the limit is "
                                      f"{st.max_messages}", param=f"items.{i}.prompt")

    def _prepare(self, scorer: Scorer, principles: list[Principle], req: ScoreRequest) -> list[Prepared]:
        out = []
        for i, it in enumerate(req.items):
            prompt = it.prompt if isinstance(it.prompt, str) else [m.model_dump() for m in it.prompt]
            try:
                out.append(scorer.prepare(principles, prompt, it.response, req.negate, req.truncate))
            except RenderError as e:
                raise InvalidRequest(f"items[{i}]: {e}", param=f"items.{i}") from None
        return out

    async def _run(self, prepared: list[Prepared]):
        fut = self.batcher.submit(prepared)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout=self.settings.request_timeout_s)
        except TimeoutError:
            raise NotReady(f"scoring took longer than {self.settings.request_timeout_s:.0f} s; the service is "
                           "overloaded, retry later", retry_after_s=10) from None
        except Exception as e:
            raise ScoringFailed(f"the model failed on this batch: {type(e).__name__}: {e}") from e

    def _plan(self, scorer: Scorer, principles: list[Principle], scale: RubricScale | None, req: ScoreRequest,
              mode: str) -> Plan:
        """Rubric and listwise requests as ordinary prepared items (rm_core.modes); errors name the item."""
        items = [(it.prompt if isinstance(it.prompt, str) else [m.model_dump() for m in it.prompt], it.response)
                 for it in req.items]
        negate = () if mode == "rubric" else tuple(req.negate)  # rubric levels carry the negation themselves

        def prepare(i: int, plist, prompt, response) -> Prepared:
            try:
                return scorer.prepare(plist, prompt, response, negate, req.truncate)
            except RenderError as e:
                raise InvalidRequest(f"items[{i}]: {e}", param=f"items.{i}") from None

        if mode == "rubric":
            return plan_rubric(prepare, principles, scale, items, req.negate)
        return plan_listwise(prepare, principles, items)

    def _rubric_scale(self, req: ScoreRequest, principles: list[Principle]) -> RubricScale:
        scale = req.rubric or self._set(req).rubric
        if scale is None:
            where = "inline principles" if req.principles is not None else f"principle set {req.principle_set or self.sets.default!r}"
            raise InvalidRequest(f"mode rubric needs a rating scale: the {where} has no 'rubric' "
                                 "({scale: [1, 10], anchors: {1: ..., 10: ...}}); add one to the set or send "
                                 "'rubric' with the request", param="rubric")
        for k, text in scale.anchors.items():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(f"rubric anchor {k} contains an unpaired surrogate; send valid Unicode text",
                                     param="rubric") from None
        bad = [p.name for p in principles if p.name in req.negate and not p.negative_definition]
        if bad:
            raise InvalidRequest(f"negate names {bad}, which have no negative_definition to rate against",
                                 param="negate")
        n = len(req.items) * len(principles) * len(scale.anchors)
        if n > self.settings.max_queue_items:
            raise PayloadTooLarge(f"mode rubric scores items x principles x anchors = {n} sequences; the limit "
                                  f"is {self.settings.max_queue_items} (max_queue_items). Send fewer items",
                                  param="items")
        return scale

    async def score(self, req: ScoreRequest, header_mode: str | None = None) -> ScoreResponse:
        self._check_limits(req)
        mode = req.mode or header_mode or "pointwise"
        if mode not in {"pointwise", "rubric", "listwise"}:
            raise InvalidRequest(f"X-Score-Mode {mode!r} is not a mode; use pointwise, rubric or listwise",
                                 param="mode")
        principles, set_hash, set_ref = self._principles(req)
        unknown = [n for n in req.negate if n not in {p.name for p in principles}]
        if unknown:
            raise InvalidRequest(f"negate names {unknown}, which are not in the principles "
                                 f"{[p.name for p in principles]}", param="negate")
        scale = self._rubric_scale(req, principles) if mode == "rubric" else None
        scorer = self.scorer()
        if mode != "pointwise":
            plan = await asyncio.to_thread(self._plan, scorer, principles, scale, req, mode)
            result = await self._run(plan.prepared)
            out = plan.fold(result.scores)
            return ScoreResponse(
                scores=out.scores, model_version=scorer.version, scorer=scorer.kind,
                principle_set_hash=set_hash, principle_set=set_ref,
                truncated=[i for i, t in enumerate(out.truncated) if t],
                usage=Usage(tokens=result.tokens, cached_tokens=result.cached_tokens), mode=mode,
                rubric=out.rubric, scale=scale.scale if scale else None, ranks=out.ranks, lists=out.lists)
        prepared = await asyncio.to_thread(self._prepare, scorer, principles, req)
        result = await self._run(prepared)
        return ScoreResponse(
            scores=result.scores, model_version=scorer.version, scorer=scorer.kind,
            principle_set_hash=set_hash, principle_set=set_ref,
            truncated=[i for i, p in enumerate(prepared) if p.truncated],
            usage=Usage(tokens=result.tokens, cached_tokens=result.cached_tokens),
        )

    async def score_queries(self, queries: list[str], prompts: list[str] | None, principle_set: str | None,
                            param: str) -> tuple[JobResult, Scorer, PrincipleSet]:
        """Whole chat-templated texts (prompt + response), split into turns by the model's own template;
        where a text does not follow it, the matching ``prompts`` entry (a prefix) marks the response.
        The stages of :meth:`score`: limits, set, render off the loop, the one batcher. ``param`` is the
        request field holding the texts, for error messages (``query``, ``input``)."""
        if len(queries) > self.settings.max_items:
            raise PayloadTooLarge(f"{len(queries)} texts in '{param}'; the limit is {self.settings.max_items}. "
                                  "Split the request", param=param)
        if prompts is not None and len(prompts) != len(queries):
            raise InvalidRequest(f"'prompts' has {len(prompts)} entries but '{param}' has {len(queries)}",
                                 param="prompts")
        s = self.sets.resolve(principle_set)
        scorer = self.scorer()
        if not hasattr(scorer, "renderer"):
            raise InvalidRequest(f"the rule scorer cannot parse chat-templated text in '{param}'; send "
                                 "(prompt, response) items to /v1/score", param=param)

        def prepare() -> list[Prepared]:
            out = []
            for i, q in enumerate(queries):
                try:
                    try:
                        msgs, response = scorer.renderer.parse_conversation(q)
                    except RenderError:
                        # Not this model's template: with the prompt given, the rest is the response.
                        if prompts is None or not q.startswith(prompts[i]):
                            raise
                        msgs, response = prompts[i], q[len(prompts[i]):]
                    out.append(scorer.prepare(list(s.principles), msgs, response, (), True))
                except RenderError as e:
                    raise InvalidRequest(f"{param}[{i}]: {e}", param=f"{param}.{i}") from None
            return out

        prepared = await asyncio.to_thread(prepare)
        return await self._run(prepared), scorer, s

    async def get_reward(self, req: RewardRequest, principle_set: str | None) -> tuple[RewardResponse, str]:
        """OpenRLHF remote-RM protocol: full chat-templated strings in, rewards out."""
        result, scorer, s = await self.score_queries(req.query, req.prompts, principle_set, "query")
        return RewardResponse(rewards=result.scores, scores=result.scores,
                              extra_logs={"model_version": scorer.version, "principle_set": s.ref}), scorer.version

    async def pool(self, req: PoolingInput, header_set: str | None, kind: str
                   ) -> ClassificationResponse | PoolingResponse:
        """vLLM's ``/classify`` (``kind`` classify) and ``/pooling``: one score per text of ``input``, or one
        for the conversation of ``messages``, through the pipeline of /get_reward or of /v1/score."""
        spec = req.principle_set or header_set
        if req.messages is not None:
            prompt, last = req.messages[:-1], (req.messages[-1] if req.messages else None)
            if last is None or last.role != "assistant" or not any(m.role == "user" for m in prompt):
                raise InvalidRequest("'messages' must end with the assistant response to score, after at least "
                                     "one user turn", param="messages")
            out = await self.score(ScoreRequest(items=[ScoreItem(prompt=prompt, response=last.content)],
                                                principle_set=spec))
            scores, version, ref, set_hash = out.scores, out.model_version, out.principle_set or "", out.principle_set_hash
            tokens, cached = out.usage.tokens, out.usage.cached_tokens
        else:
            texts = [req.input] if isinstance(req.input, str) else list(req.input or [])
            result, scorer, s = await self.score_queries(texts, None, spec, "input")
            scores, version, ref, set_hash = result.scores, scorer.version, s.ref, s.hash
            tokens, cached = result.tokens, result.cached_tokens
        if req.activate:
            scores = [1.0 / (1.0 + math.exp(-x)) if x >= -700 else 0.0 for x in scores]
        common = dict(created=int(time.time()), model=req.model or version, model_version=version,
                      principle_set=ref, principle_set_hash=set_hash,
                      usage=PoolingUsage(prompt_tokens=tokens, total_tokens=tokens,
                                         prompt_tokens_details=PromptTokensDetails(cached_tokens=cached)))
        suffix = req.request_id or uuid.uuid4().hex
        if kind == "classify":
            return ClassificationResponse(id=f"classify-{suffix}", **common,
                                          data=[ClassificationData(index=i, probs=[x]) for i, x in enumerate(scores)])
        encode = isinstance(req, PoolingRequest) and req.encoding_format == "base64"
        order = {"little": "<", "big": ">"}.get(getattr(req, "endianness", "native"), "=")
        return PoolingResponse(id=f"pool-{suffix}", **common, data=[
            PoolingData(index=i, data=base64.b64encode(struct.pack(f"{order}f", x)).decode() if encode else [x])
            for i, x in enumerate(scores)])

    def model_info(self) -> ModelInfo:
        s = self.settings
        sc = self.models.scorer
        return ModelInfo(
            scorer=sc.kind if sc else "loading", model_version=sc.version if sc else "none",
            base_model=sc.base_model if sc else s.model, registry=str(s.registry) if s.registry else None,
            prompt_format_version=PROMPT_FORMAT_VERSION, default_principle_set=self.sets.default,
            limits={"max_items": s.max_items, "max_prompt_tokens": s.max_prompt_tokens,
                    "max_response_tokens": s.max_response_tokens, "max_body_bytes": s.max_body_bytes,
                    "max_batch_tokens": s.max_batch_tokens, "max_padding": s.max_padding,
                    "max_queue_items": s.max_queue_items, "max_principles": s.max_principles, "max_messages": s.max_messages},
            prefix_cache=self.models.prefix_cache.stats(), last_reload_error=self.models.last_reload_error,
        )
