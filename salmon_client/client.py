"""The one client of the reward service: async httpx, pooled, bounded retries, never a made-up reward.

- Pooled keep-alive connections (``httpx.Limits``), separate connect/read timeouts.
- Retries only what can succeed later: 429, 5xx, connection errors, timeouts. Waits grow
  exponentially with jitter (so ranks and replicas do not retry in lockstep), a ``Retry-After``
  header (429 queue full, 503 still loading) is honoured, and TIME bounds the whole thing: a
  restart of the service (killed, rescheduled, reloading its model) is ridden out as long as it
  ends within ``budget_s`` of the first failure, however many tries that takes; a count of tries is
  an optional extra bound. The budget starts at the first failure, not the first try, so a request
  that ran into ``read_timeout_s`` (a loaded service, not a dead one) still has the whole budget to
  be tried again. Other 4xx (401/403/404/413/422) are not retried: the same request would fail the same way.
- Error messages carry the service's own words: its ``{"error": {"message", "type", "param",
  "code"}}`` body (docs/contract.md), or FastAPI's ``{"detail": ...}`` from other servers.
- After the budget it raises :class:`RewardServiceError` naming the URL and the last error. There
  is no fallback score: a silent 0 would train the policy on noise.
- A generation batch goes out in as few requests as the server's ``max_items`` allows, keeping a
  prompt's group together (one principle list per request; the group shares the prompt prefix,
  which the service caches). A 413 halves the request and the client remembers the smaller size
  for its later calls, so a server whose limit shrank costs one 413, not one per call.
- A set the client registered and the service forgot (a restart) is registered again, once.
- Speaks salmon's ``/v1/score`` and OpenRLHF's ``/get_reward``.

:class:`AsyncSalmonClient` is the client; :class:`SalmonClient` runs the same object on a private
event loop for code that is not async (verl's and OpenRLHF's reward functions), so both have the
same retries, splitting and re-registration by construction.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from principles.schema import PrincipleSet, load_principle_set, parse_principle_set
from salmon.errors import Unavailable

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
RETRY_EXCEPTIONS = (httpx.TransportError,)  # connect/read/write errors, timeouts, protocol errors
DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV, API_KEY_ENV, ADMIN_KEY_ENV = "SALMON_URL", "SALMON_API_KEY", "SALMON_ADMIN_KEY"
SET_FILE_SUFFIXES = frozenset({".yaml", ".yml", ".json"})

Prompt = str | list[dict[str, str]]
# A principle set as a caller names it: a registered name or name@hash, a YAML/JSON file, a loaded
# PrincipleSet, or a set as a mapping. Inline principles (a list) go in ``principles=`` instead.
PrincipleSpec = str | os.PathLike | PrincipleSet | dict | None
T = TypeVar("T")


class RewardServiceError(Unavailable):
    """The reward service could not score a batch; the message names the URL and the last error.

    ``status`` is the HTTP status of a refused request (None when the service was unreachable);
    ``retryable`` is False for a request the service refused and would refuse again (a 4xx).
    """

    def __init__(self, url: str, message: str, *, retryable: bool = True, attempts: int = 0,
                 status: int | None = None):
        super().__init__(message)
        self.url, self.retryable, self.attempts, self.status = url, retryable, attempts, status


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class RetryPolicy:
    """When to try again: until ``budget_s`` has passed since the first failed try (the last wait is cut to
    end at the budget, so the final try lands there); ``max_attempts`` (None: no count) can stop it sooner."""

    max_attempts: int | None = None
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    jitter: float = 0.5
    budget_s: float = 120.0
    rng: random.Random = field(default_factory=random.Random)

    def backoff(self, attempt: int) -> float:
        """Wait after failed try number ``attempt`` (1-based): exponential, capped, part of it random."""
        base = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1))
        return base * (1 - self.jitter) + base * self.jitter * self.rng.random()


@dataclass
class Limits:
    max_items: int
    max_principles: int | None = None


@dataclass
class Group:
    """One prompt's completions (a GRPO/RLOO group), scored against one principle selection."""

    prompt: Prompt | None
    responses: list[str]
    principles: list[dict[str, str]] | None = None  # inline principles; None -> principle_set
    principle_set: str | None = None  # name@hash
    key: Any = None  # groups with equal keys may share a request
    rendered: bool = False  # /get_reward only: each response is already the whole templated query


def plan_requests(groups: Sequence[Group], max_items: int) -> list[list[tuple[int, int, int]]]:
    """Pack groups into requests: ``[[(group index, start, end), ...], ...]``.

    Only groups with the same key (same principles) share a request. Within a key, first-fit
    decreasing keeps every group whole; a group larger than ``max_items`` alone is split.
    """
    by_key: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        by_key.setdefault(g.key, []).append(i)
    plan: list[list[tuple[int, int, int]]] = []
    for idxs in by_key.values():
        pieces: list[tuple[int, int, int]] = []
        for i in idxs:
            n = len(groups[i].responses)
            pieces += [(i, s, min(s + max_items, n)) for s in range(0, n, max_items)] if n else []
        bins: list[tuple[int, list[tuple[int, int, int]]]] = []  # (free slots, pieces)
        for piece in sorted(pieces, key=lambda p: p[2] - p[1], reverse=True):
            size = piece[2] - piece[1]
            for b, (free, content) in enumerate(bins):
                if size <= free:
                    content.append(piece)
                    bins[b] = (free - size, content)
                    break
            else:
                bins.append((max_items - size, [piece]))
        plan += [sorted(content) for _, content in bins]
    return plan


@dataclass
class CallStats:
    """What the last scoring call cost: requests, retries, seconds."""

    requests: int = 0
    retries: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ScoreMeta:
    """What the service said about the scores of one request."""

    model_version: str
    principle_set: str  # name@hash (inline: inline@hash)
    principle_set_hash: str
    scorer: str | None = None


@dataclass(frozen=True)
class ScoreResult:
    """Scores of one call, in item order, and what produced them.

    ``model_version``, ``principle_set`` (``name@hash``) and ``principle_set_hash`` are the service's;
    a call split into several requests while the service reloaded (or while someone replaced a set
    named without a hash) lists each value, sorted and comma-separated, so a mixed batch never passes
    for a clean one.
    """

    scores: list[float]
    model_version: str
    principle_set: str
    principle_set_hash: str
    scorer: str | None
    requests: int
    retries: int

    @classmethod
    def build(cls, scores: list[float], metas: Sequence[ScoreMeta], stats: CallStats) -> ScoreResult:
        def joined(values: Sequence[str | None]) -> str:
            return ",".join(sorted({v for v in values if v}))

        scorers = {m.scorer for m in metas if m.scorer}
        return cls(scores=scores, model_version=joined([m.model_version for m in metas]),
                   principle_set=joined([m.principle_set for m in metas]),
                   principle_set_hash=joined([m.principle_set_hash for m in metas]),
                   scorer=",".join(sorted(scorers)) or None, requests=stats.requests, retries=stats.retries)


def is_set_file(spec: str | os.PathLike) -> bool:
    """A principle-set spec that names a file rather than a set registered on the service."""
    p = Path(spec)
    return p.suffix.lower() in SET_FILE_SUFFIXES or os.sep in str(spec) or p.is_file()


def inline_principles(principles: Sequence[str | dict | Any]) -> list[dict[str, str]] | list[str]:
    """Inline principles as /v1/score takes them: bare definitions, or {name, definition,
    negative_definition}; a ``principles.schema.Principle`` is sent with those three fields."""
    out: list[Any] = []
    for p in principles:
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, dict):
            out.append({k: v for k, v in p.items() if k in {"name", "definition", "negative_definition"}})
        else:
            d = {"name": p.name, "definition": p.definition}
            if getattr(p, "negative_definition", None):
                d["negative_definition"] = p.negative_definition
            out.append(d)
    return out


def _env(name: str | None) -> str | None:
    return (os.environ.get(name) or None) if name else None


class AsyncSalmonClient:
    """Async client; create once per run. Safe to use from one event loop at a time (TRL's daemon loop
    for scoring; ``asyncio.run`` for setup): the pooled ``httpx.AsyncClient`` is bound to the loop
    that first uses it and is re-created if a different loop calls.

    ``url`` defaults to ``$SALMON_URL``, then http://127.0.0.1:8000. The API key is ``api_key``, else
    the variable ``api_key_env`` names (``SALMON_API_KEY``); the admin key (registering principle
    sets) likewise from ``SALMON_ADMIN_KEY``, falling back to the API key. Pass ``api_key_env=None``
    to read no environment.
    """

    def __init__(self, url: str | None = None, *, protocol: str = "salmon", api_key: str | None = None,
                 admin_key: str | None = None, api_key_env: str | None = API_KEY_ENV,
                 admin_key_env: str | None = ADMIN_KEY_ENV, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 120.0, max_connections: int = 8, max_concurrent_requests: int = 4,
                 max_items: int | None = None, retry: RetryPolicy | None = None,
                 headers: dict[str, str] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 render_query: Callable[[Any, str], str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.url = (url or _env(URL_ENV) or DEFAULT_URL).rstrip("/")
        self.protocol = protocol
        self.api_key = api_key or _env(api_key_env)
        self.admin_key = admin_key or _env(admin_key_env) or self.api_key
        self.timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self.pool = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.max_concurrent = max_concurrent_requests
        self.max_items_override = max_items
        self.retry = retry or RetryPolicy()
        self.headers = dict(headers or {})
        self._sleep = sleep
        self._render_query = render_query
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limits: Limits | None = None
        # The largest request size known to pass after a 413 (None: no 413 seen). It outlives the
        # cached limits: a limit re-read from /v1/model may still be more than the body limit allows.
        self.learned_max_items: int | None = None
        self.registered: dict[str, PrincipleSet] = {}  # ref -> set, re-registered if the service forgot it
        self._set_files: dict[tuple[str, int], str] = {}  # (path, mtime) -> ref, so a file is PUT once
        self.last = CallStats()

    # -- plumbing --------------------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # A client cannot move between event loops; the old one's loop is gone or not ours to close.
            self._client = httpx.AsyncClient(base_url=self.url, timeout=self.timeout, limits=self.pool,
                                             transport=self._transport)
            self._loop = loop
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client, self._loop = None, None

    async def __aenter__(self) -> AsyncSalmonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _auth(self, admin: bool) -> dict[str, str]:
        key = self.admin_key if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def request(self, method: str, path: str, *, json: Any = None, admin: bool = False,
                      headers: dict[str, str] | None = None, stats: CallStats | None = None) -> httpx.Response:
        """One logical request with the retry policy; returns a 2xx response or raises RewardServiceError."""
        hdrs = {**self.headers, **self._auth(admin), **(headers or {})}
        start: float | None = None  # the first failure: a slow first try must not spend the budget
        attempt = 0
        while True:
            attempt += 1
            if stats is not None:
                stats.requests += 1
            retry_after = None
            try:
                resp = await self._http().request(method, path, json=json, headers=hdrs)
            except RETRY_EXCEPTIONS as e:
                last = f"{type(e).__name__}: {e or 'no detail'}"
            else:
                if resp.status_code < 400:
                    return resp
                last = f"HTTP {resp.status_code}: {_detail(resp)}"
                if resp.status_code not in RETRY_STATUS:
                    raise RewardServiceError(self.url, f"{method} {self.url}{path} failed with {last} "
                                             "(not retried: the same request would fail again)",
                                             retryable=False, attempts=attempt, status=resp.status_code)
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            if start is None:
                start = time.monotonic()
            elapsed = time.monotonic() - start
            left = self.retry.budget_s - elapsed
            wait = self.retry.backoff(attempt)
            if retry_after is not None:
                wait = max(wait, retry_after)
            out_of_tries = self.retry.max_attempts is not None and attempt >= self.retry.max_attempts
            # A Retry-After past the budget means the service itself says it will not be back in time.
            if out_of_tries or left <= 0 or (retry_after is not None and retry_after > left):
                tries = f", at most {self.retry.max_attempts} tries" if self.retry.max_attempts else ""
                raise RewardServiceError(
                    self.url, f"reward service {self.url} unreachable: {method} {path} failed {attempt} times "
                    f"over {elapsed:.1f} s since the first failure (retry budget {self.retry.budget_s:g} s{tries}); last error: {last}",
                    attempts=attempt)
            wait = min(wait, left)
            log.warning("reward service %s%s: %s; retry %d in %.2f s", self.url, path, last, attempt, wait)
            if stats is not None:
                stats.retries += 1
            await self._sleep(wait)

    # -- service metadata and principle sets -------------------------------------------------------
    async def limits(self) -> Limits:
        if self._limits is None:
            if self.max_items_override is not None:
                self._limits = Limits(self.max_items_override)
            elif self.protocol == "openrlhf":
                self._limits = Limits(64)  # OpenRLHF servers publish no limit; 64 is what their clients send
            else:
                body = await self.model_info()
                lim = body.get("limits") or {}
                if not isinstance(lim.get("max_items"), int) or lim["max_items"] < 1:
                    raise RewardServiceError(self.url, f"GET {self.url}/v1/model gave no limits.max_items; "
                                             "set reward.max_items_per_request", retryable=False)
                self._limits = Limits(lim["max_items"], lim.get("max_principles"))
        if self.learned_max_items is not None and self.learned_max_items < self._limits.max_items:
            return Limits(self.learned_max_items, self._limits.max_principles)
        return self._limits

    async def model_info(self) -> dict[str, Any]:
        """``GET /v1/model``: the scorer, its version and the limits (docs/contract.md)."""
        body = _json(await self.request("GET", "/v1/model"), self.url, "/v1/model")
        if not isinstance(body, dict):
            raise RewardServiceError(self.url, f"GET {self.url}/v1/model did not answer an object", retryable=False)
        return body

    async def register_set(self, pset: PrincipleSet) -> str:
        """PUT the set; returns name@hash and checks the service hashes it as we do."""
        try:
            resp = await self.request("PUT", f"/v1/principle-sets/{pset.name}", json=pset.canonical(), admin=True)
        except RewardServiceError as e:
            if e.status in (401, 403):
                raise RewardServiceError(self.url, f"{e}; registering a principle set needs the admin key "
                                         f"(${ADMIN_KEY_ENV}) when the service has one, or register "
                                         f"{pset.name!r} on the service and name it", retryable=False,
                                         attempts=e.attempts, status=e.status) from None
            raise
        body = _json(resp, self.url, "/v1/principle-sets")
        if body.get("hash") not in (None, pset.hash):
            raise RewardServiceError(self.url, f"service hashed principle set {pset.name!r} as {body.get('hash')} "
                                     f"but salmon computes {pset.hash}: service and trainer disagree on the "
                                     "set format (upgrade one of them)", retryable=False)
        self.registered[pset.ref] = pset
        return pset.ref

    async def fetch_set(self, name: str) -> PrincipleSet:
        """A set registered on the service by someone else (the run names it but has no file)."""
        resp = await self.request("GET", f"/v1/principle-sets/{name}")
        body = _json(resp, self.url, "/v1/principle-sets")
        data = body.get("set", body) if isinstance(body, dict) else body
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k in {"name", "description", "principles"}}
        return parse_principle_set(data, where=f"{self.url}/v1/principle-sets/{name}")

    async def resolve_set(self, spec: PrincipleSpec) -> str | None:
        """What a request names the set by: a registered name or name@hash as given; a file, a mapping or a
        PrincipleSet is registered first (once per file version) and named by its name@hash. None: the
        service's default set. Raises PrincipleSetError (a UserError) for a file that does not validate."""
        if spec is None:
            return None
        if isinstance(spec, PrincipleSet):
            return spec.ref if spec.ref in self.registered else await self.register_set(spec)
        if isinstance(spec, dict):
            return await self.resolve_set(parse_principle_set(spec, where="principle set"))
        if is_set_file(spec):
            path = Path(spec)
            try:
                key = (str(path.resolve()), path.stat().st_mtime_ns)
            except OSError:
                key = (str(path), 0)  # load_principle_set says what is wrong with the path
            if key not in self._set_files:
                self._set_files[key] = await self.register_set(load_principle_set(path))
            return self._set_files[key]
        return str(spec)

    # -- scoring ----------------------------------------------------------------------------------
    async def score(self, items: Sequence[tuple[Prompt, str] | dict[str, Any]], *,
                    principle_set: PrincipleSpec = None, principles: Sequence[str | dict | Any] | None = None,
                    headers: dict[str, str] | None = None, mode: str | None = None) -> ScoreResult:
        """Score (prompt, response) items (tuples or {"prompt", "response"} dicts) on ``/v1/score``.

        ``mode`` (``pointwise``, ``rubric`` or ``listwise``) is sent as the ``X-Score-Mode`` header;
        unset, the service scores pointwise.

        The principles are ``principles`` (inline: definitions or {name, definition,
        negative_definition}), else ``principle_set`` (see :meth:`resolve_set`), else the service's
        default set. Items of one prompt go out together (the service caches the shared prefix); the
        call is split by the service's ``max_items``.
        """
        pairs = [(it["prompt"], it["response"]) if isinstance(it, dict) else (it[0], it[1]) for it in items]
        inline = inline_principles(principles) if principles is not None else None
        ref = None if inline is not None else await self.resolve_set(principle_set)
        groups, where = _group_by_prompt(pairs, lambda prompt, responses: Group(
            prompt=prompt, responses=responses, principles=inline, principle_set=ref, key="call"))
        if mode is not None:
            headers = {**(headers or {}), "X-Score-Mode": mode}
        scores, metas, stats = await self._score_groups(groups, headers, protocol="salmon")
        return ScoreResult.build(_ungroup(scores, where), [m for row in metas for m in row], stats)

    async def get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None = None, *,
                         principle_set: PrincipleSpec = None,
                         headers: dict[str, str] | None = None) -> ScoreResult:
        """Score whole chat-templated texts (prompt + response) on OpenRLHF's ``/get_reward``; ``prompts``
        (the prompt part of each query) marks where the response starts when the text does not follow
        the served model's template. The set goes in the ``X-Principle-Set`` header."""
        if prompts is not None and len(prompts) != len(queries):
            raise ValueError(f"prompts has {len(prompts)} entries but queries has {len(queries)}")
        ref = await self.resolve_set(principle_set)
        groups = [Group(prompt=prompts[i] if prompts is not None else None, responses=[q], principle_set=ref,
                        key="call", rendered=True) for i, q in enumerate(queries)]
        scores, metas, stats = await self._score_groups(groups, headers, protocol="openrlhf")
        return ScoreResult.build([row[0] for row in scores], [m for row in metas for m in row], stats)

    async def score_groups(self, groups: Sequence[Group], headers: dict[str, str] | None = None) -> list[list[float]]:
        """Scores for every response of every group, in order. Raises RewardServiceError, never guesses."""
        scores, _, _ = await self._score_groups(groups, headers, protocol=self.protocol)
        return scores

    async def _score_groups(self, groups: Sequence[Group], headers: dict[str, str] | None, protocol: str
                            ) -> tuple[list[list[float]], list[list[ScoreMeta]], CallStats]:
        stats = CallStats()
        t0 = time.monotonic()
        limits = await self.limits()
        plan = plan_requests(groups, limits.max_items)
        out: list[list[Any]] = [[None] * len(g.responses) for g in groups]
        metas: list[list[Any]] = [[None] * len(g.responses) for g in groups]
        sem = asyncio.Semaphore(self.max_concurrent)

        async def one(pieces: list[tuple[int, int, int]]) -> None:
            async with sem:
                scored = await self._score_pieces(groups, pieces, headers, stats, protocol)
            pos = 0
            for gi, s, e in pieces:
                out[gi][s:e] = [x for x, _ in scored[pos:pos + e - s]]
                metas[gi][s:e] = [m for _, m in scored[pos:pos + e - s]]
                pos += e - s

        await asyncio.gather(*(one(p) for p in plan))
        stats.seconds = time.monotonic() - t0
        self.last = stats
        return [[float(x) for x in row] for row in out], metas, stats

    def _body(self, groups: Sequence[Group], pieces: list[tuple[int, int, int]], protocol: str
              ) -> tuple[str, dict[str, Any], dict[str, str], str]:
        """(path, body, extra headers, field holding the scores) of one request."""
        first = groups[pieces[0][0]]
        prompts = [groups[gi].prompt for gi, s, e in pieces for _ in range(s, e)]
        responses = [r for gi, s, e in pieces for r in groups[gi].responses[s:e]]
        if protocol == "openrlhf":
            if first.rendered:
                body: dict[str, Any] = {"query": responses}
                if all(isinstance(p, str) for p in prompts):
                    body["prompts"] = prompts
            else:
                if self._render_query is None:
                    raise ValueError("protocol openrlhf needs render_query (prompt, response) -> text")
                body = {"query": [self._render_query(p, r) for p, r in zip(prompts, responses, strict=True)],
                        "prompts": [p if isinstance(p, str) else self._render_query(p, "") for p in prompts]}
            hdrs = {"X-Principle-Set": first.principle_set} if first.principle_set else {}
            return "/get_reward", body, hdrs, "rewards"
        body = {"items": [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]}
        if first.principles is not None:
            body["principles"] = first.principles
        elif first.principle_set:
            body["principle_set"] = first.principle_set
        return "/v1/score", body, {}, "scores"

    async def _score_pieces(self, groups: Sequence[Group], pieces: list[tuple[int, int, int]],
                            headers: dict[str, str] | None, stats: CallStats, protocol: str
                            ) -> list[tuple[float, ScoreMeta]]:
        first = groups[pieces[0][0]]
        n = sum(end - start for _, start, end in pieces)
        path, body, extra, field_ = self._body(groups, pieces, protocol)
        hdrs = {**(headers or {}), **extra}
        try:
            resp = await self.request("POST", path, json=body, headers=hdrs, stats=stats)
        except RewardServiceError as e:
            if e.status == 404 and first.principle_set in self.registered and first.principles is None:
                # The service restarted and forgot sets registered over HTTP: register again, try once more.
                log.warning("service %s forgot principle set %s; registering it again", self.url, first.principle_set)
                await self.register_set(self.registered[first.principle_set])
                resp = await self.request("POST", path, json=body, headers=hdrs, stats=stats)
            elif e.status == 413 and n > 1:
                # The server's limit is smaller than we thought (e.g. restarted with other settings, or a
                # body-size limit): halve, and send later calls at most the larger half.
                self._limits = None
                self.learned_max_items = min(self.learned_max_items or n, (n + 1) // 2)
                half = _halve(pieces)
                return [x for part in half
                        for x in await self._score_pieces(groups, part, headers, stats, protocol)]
            else:
                raise
        data = _json(resp, self.url, path)
        scores = data.get(field_) if isinstance(data, dict) else None
        if not isinstance(scores, list) or len(scores) != n:
            raise RewardServiceError(self.url, f"POST {self.url}{path} returned {len(scores) if isinstance(scores, list) else 'no'} "
                                     f"'{field_}' for {n} items", retryable=False)
        vals = []
        for s in scores:
            if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
                raise RewardServiceError(self.url, f"POST {self.url}{path} returned a non-finite or non-numeric "
                                         f"score {s!r}", retryable=False)
            vals.append(float(s))
        meta = _meta(data, resp)
        return [(v, meta) for v in vals]


def _meta(data: dict[str, Any], resp: httpx.Response) -> ScoreMeta:
    """The version and set of one answer: /v1/score's fields, or /get_reward's extra_logs and header."""
    logs = data.get("extra_logs") if isinstance(data.get("extra_logs"), dict) else {}
    version = data.get("model_version") or logs.get("model_version") or resp.headers.get("X-Model-Version") or ""
    ref = data.get("principle_set") or logs.get("principle_set") or ""
    set_hash = data.get("principle_set_hash") or (ref.rsplit("@", 1)[1] if "@" in str(ref) else "")
    return ScoreMeta(model_version=str(version), principle_set=str(ref), principle_set_hash=str(set_hash),
                     scorer=data.get("scorer"))


def _prompt_key(prompt: Prompt) -> Any:
    return prompt if isinstance(prompt, str) else tuple((m.get("role"), m.get("content")) for m in prompt)


def _group_by_prompt(pairs: Sequence[tuple[Prompt, str]], make: Callable[[Prompt, list[str]], Group]
                     ) -> tuple[list[Group], list[tuple[int, int]]]:
    """One group per distinct prompt (first-seen order) and, per item, (group, position) to undo it."""
    index: dict[Any, int] = {}
    members: list[tuple[Prompt, list[str]]] = []
    where = []
    for prompt, response in pairs:
        gi = index.setdefault(_prompt_key(prompt), len(members))
        if gi == len(members):
            members.append((prompt, []))
        where.append((gi, len(members[gi][1])))
        members[gi][1].append(response)
    return [make(p, rs) for p, rs in members], where


def _ungroup(scores: list[list[float]], where: list[tuple[int, int]]) -> list[float]:
    return [scores[gi][pos] for gi, pos in where]


def _halve(pieces: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    if len(pieces) > 1:
        mid = len(pieces) // 2
        return [pieces[:mid], pieces[mid:]]
    gi, s, e = pieces[0]
    mid = (s + e) // 2
    return [[(gi, s, mid)], [(gi, mid, e)]]


def _detail(resp: httpx.Response) -> str:
    """What the server said went wrong: salmon's error object as "message (type, param)", else the
    body's ``detail``, else the raw text."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        extra = ", ".join(str(err[k]) if k == "type" else f"{k} {err[k]}"
                          for k in ("type", "param") if err.get(k))
        return (err["message"] + (f" ({extra})" if extra else ""))[:300]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return str(detail)[:300]


def _json(resp: httpx.Response, url: str, path: str) -> Any:
    try:
        return resp.json()
    except ValueError:
        raise RewardServiceError(url, f"{url}{path} answered {resp.status_code} with a body that is not JSON: "
                                 f"{resp.text[:200]!r}", retryable=False) from None


class SalmonClient:
    """The same client for code that is not async: every call runs :class:`AsyncSalmonClient` on a private
    event loop in a daemon thread, so retries, 413 splitting, re-registration and the connection pool
    are the async client's. Safe to call from several threads at once (OpenRLHF calls its reward
    function from a thread pool) and from inside someone else's running event loop (it blocks that
    loop's thread for the call, as any sync call does). Takes :class:`AsyncSalmonClient`'s arguments.
    """

    def __init__(self, url: str | None = None, **kwargs: Any):
        self.aio = AsyncSalmonClient(url, **kwargs)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    @property
    def url(self) -> str:
        return self.aio.url

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            # A forked worker (Ray, multiprocessing) inherits the loop object but not its thread.
            if self._loop is None or self._pid != os.getpid() or not (self._thread and self._thread.is_alive()):
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="salmon-client", daemon=True)
                self._thread.start()
                self._pid = os.getpid()
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def score(self, items: Sequence[tuple[Prompt, str] | dict[str, Any]], *, principle_set: PrincipleSpec = None,
              principles: Sequence[str | dict | Any] | None = None,
              headers: dict[str, str] | None = None, mode: str | None = None) -> ScoreResult:
        """See :meth:`AsyncSalmonClient.score`."""
        return self._run(self.aio.score(items, principle_set=principle_set, principles=principles, headers=headers,
                                        mode=mode))

    def get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None = None, *,
                   principle_set: PrincipleSpec = None, headers: dict[str, str] | None = None) -> ScoreResult:
        """See :meth:`AsyncSalmonClient.get_reward`."""
        return self._run(self.aio.get_reward(queries, prompts, principle_set=principle_set, headers=headers))

    def score_groups(self, groups: Sequence[Group], headers: dict[str, str] | None = None) -> list[list[float]]:
        return self._run(self.aio.score_groups(groups, headers))

    def resolve_set(self, spec: PrincipleSpec) -> str | None:
        return self._run(self.aio.resolve_set(spec))

    def register_set(self, pset: PrincipleSet) -> str:
        return self._run(self.aio.register_set(pset))

    def fetch_set(self, name: str) -> PrincipleSet:
        return self._run(self.aio.fetch_set(name))

    def model_info(self) -> dict[str, Any]:
        return self._run(self.aio.model_info())

    def limits(self) -> Limits:
        return self._run(self.aio.limits())

    def close(self) -> None:
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None or not thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.aio.aclose(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

    def __enter__(self) -> SalmonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SHARED: dict[tuple[str | None, str | None], SalmonClient] = {}
_SHARED_LOCK = threading.Lock()


def shared_client(url: str | None = None, **kwargs: Any) -> SalmonClient:
    """One :class:`SalmonClient` per process and URL (and API key), for reward functions that a framework
    calls once per sample: they then share one connection pool and what the client learnt (limits,
    registered sets). ``kwargs`` apply when the client is first made."""
    key = (url or _env(URL_ENV), kwargs.get("api_key") or _env(kwargs.get("api_key_env", API_KEY_ENV)))
    with _SHARED_LOCK:
        client = _SHARED.get(key)
        if client is None:
            client = _SHARED[key] = SalmonClient(url, **kwargs)
        return client
