"""The one client of the reward service: async httpx, pooled, bounded retries, never a made-up reward.

- Pooled keep-alive connections (``httpx.Limits``), separate connect/read timeouts.
- Retries only what can succeed later: 429, 5xx, connection errors, timeouts. Waits grow
  exponentially with jitter (so ranks and replicas do not retry in lockstep), a ``Retry-After``
  header (429 queue full, 503 still loading) is honoured, and TIME bounds the whole thing: a
  restart of the service (killed, rescheduled, reloading its model) is ridden out as long as it
  ends within ``budget_s``, however many tries that takes; a count of tries is an optional extra
  bound. Other 4xx (401/403/404/413/422) are not retried: the same request would fail the same way.
- Error messages carry the service's own words: its ``{"error": {"message", "type", "param",
  "code"}}`` body (docs/contract.md), or FastAPI's ``{"detail": ...}`` from other servers.
- After the budget it raises :class:`RewardServiceError` naming the URL and the last error. There
  is no fallback score: a silent 0 would train the policy on noise.
- A generation batch goes out in as few requests as the server's ``max_items`` allows, keeping a
  prompt's group together (one principle list per request; the group shares the prompt prefix,
  which the service caches).
- Speaks salmon's ``/v1/score`` and OpenRLHF's ``/get_reward``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from policy_trainer.config import RetryConfig
from principles.schema import PrincipleSet, parse_principle_set
from salmon.errors import Unavailable

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
RETRY_EXCEPTIONS = (httpx.TransportError,)  # connect/read/write errors, timeouts, protocol errors


class RewardServiceError(Unavailable):
    """The reward service could not score a batch; the message names the URL and the last error."""

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
    """When to try again: until ``budget_s`` has passed since the first try (the last wait is cut to end
    at the budget, so the final try lands there); ``max_attempts`` (None: no count) can stop it sooner."""

    max_attempts: int | None = None
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    jitter: float = 0.5
    budget_s: float = 120.0
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def from_config(cls, cfg: RetryConfig) -> RetryPolicy:
        return cls(cfg.max_attempts, cfg.initial_backoff_s, cfg.max_backoff_s, cfg.jitter, cfg.budget_s)

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

    prompt: str | list[dict[str, str]]
    responses: list[str]
    principles: list[dict[str, str]] | None = None  # inline principles; None -> principle_set
    principle_set: str | None = None  # name@hash
    key: Any = None  # groups with equal keys may share a request


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


class RewardClient:
    """Async client; create once per run. Safe to use from one event loop at a time (TRL's daemon loop
    for scoring; ``asyncio.run`` for setup): the pooled ``httpx.AsyncClient`` is bound to the loop
    that first uses it and is re-created if a different loop calls."""

    def __init__(self, url: str, *, protocol: str = "salmon", api_key: str | None = None,
                 admin_key: str | None = None, connect_timeout_s: float = 5.0, read_timeout_s: float = 120.0,
                 max_connections: int = 8, max_concurrent_requests: int = 4, max_items: int | None = None,
                 retry: RetryPolicy | None = None, headers: dict[str, str] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 render_query: Callable[[Any, str], str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.url = url.rstrip("/")
        self.protocol = protocol
        self.api_key, self.admin_key = api_key, admin_key or api_key
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
        self.registered: dict[str, PrincipleSet] = {}  # ref -> set, re-registered if the service forgot it
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

    def _auth(self, admin: bool) -> dict[str, str]:
        key = self.admin_key if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def request(self, method: str, path: str, *, json: Any = None, admin: bool = False,
                      headers: dict[str, str] | None = None, stats: CallStats | None = None) -> httpx.Response:
        """One logical request with the retry policy; returns a 2xx response or raises RewardServiceError."""
        hdrs = {**self.headers, **self._auth(admin), **(headers or {})}
        start = time.monotonic()
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
                    f"over {elapsed:.1f} s (retry budget {self.retry.budget_s:g} s{tries}); last error: {last}",
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
                body = _json(await self.request("GET", "/v1/model"), self.url, "/v1/model")
                lim = body.get("limits") or {}
                if not isinstance(lim.get("max_items"), int) or lim["max_items"] < 1:
                    raise RewardServiceError(self.url, f"GET {self.url}/v1/model gave no limits.max_items; "
                                             "set reward.max_items_per_request", retryable=False)
                self._limits = Limits(lim["max_items"], lim.get("max_principles"))
        return self._limits

    async def register_set(self, pset: PrincipleSet) -> str:
        """PUT the set; returns name@hash and checks the service hashes it as we do."""
        body = _json(await self.request("PUT", f"/v1/principle-sets/{pset.name}", json=pset.canonical(),
                                        admin=True), self.url, "/v1/principle-sets")
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

    # -- scoring ----------------------------------------------------------------------------------
    async def score_groups(self, groups: Sequence[Group], headers: dict[str, str] | None = None) -> list[list[float]]:
        """Scores for every response of every group, in order. Raises RewardServiceError, never guesses."""
        stats = CallStats()
        t0 = time.monotonic()
        limits = await self.limits()
        plan = plan_requests(groups, limits.max_items)
        out: list[list[float | None]] = [[None] * len(g.responses) for g in groups]
        sem = asyncio.Semaphore(self.max_concurrent)

        async def one(pieces: list[tuple[int, int, int]]) -> None:
            async with sem:
                scores = await self._score_pieces(groups, pieces, headers, stats)
            pos = 0
            for gi, s, e in pieces:
                out[gi][s:e] = scores[pos:pos + e - s]
                pos += e - s

        await asyncio.gather(*(one(p) for p in plan))
        stats.seconds = time.monotonic() - t0
        self.last = stats
        return [[float(x) for x in row] for row in out]  # type: ignore[arg-type]

    async def _score_pieces(self, groups: Sequence[Group], pieces: list[tuple[int, int, int]],
                            headers: dict[str, str] | None, stats: CallStats) -> list[float]:
        first = groups[pieces[0][0]]
        prompts = [groups[gi].prompt for gi, s, e in pieces for _ in range(s, e)]
        responses = [r for gi, s, e in pieces for r in groups[gi].responses[s:e]]
        if self.protocol == "openrlhf":
            if self._render_query is None:
                raise ValueError("protocol openrlhf needs render_query (prompt, response) -> text")
            body: dict[str, Any] = {"query": [self._render_query(p, r) for p, r in zip(prompts, responses, strict=True)],
                                    "prompts": [p if isinstance(p, str) else self._render_query(p, "")
                                                for p in prompts]}
            hdrs = {**(headers or {}), **({"X-Principle-Set": first.principle_set} if first.principle_set else {})}
            path, field_ = "/get_reward", "rewards"
        else:
            body = {"items": [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]}
            if first.principles is not None:
                body["principles"] = first.principles
            elif first.principle_set:
                body["principle_set"] = first.principle_set
            hdrs, path, field_ = dict(headers or {}), "/v1/score", "scores"
        try:
            resp = await self.request("POST", path, json=body, headers=hdrs, stats=stats)
        except RewardServiceError as e:
            if e.status == 404 and first.principle_set in self.registered and first.principles is None:
                # The service restarted and forgot sets registered over HTTP: register again, try once more.
                log.warning("service %s forgot principle set %s; registering it again", self.url, first.principle_set)
                await self.register_set(self.registered[first.principle_set])
                resp = await self.request("POST", path, json=body, headers=hdrs, stats=stats)
            elif e.status == 413 and sum(end - start for _, start, end in pieces) > 1:
                # The server's limit shrank (e.g. restarted with other settings): halve and go on.
                self._limits = None
                half = _halve(pieces)
                return [x for part in half for x in await self._score_pieces(groups, part, headers, stats)]
            else:
                raise
        data = _json(resp, self.url, path)
        scores = data.get(field_) if isinstance(data, dict) else None
        if not isinstance(scores, list) or len(scores) != len(responses):
            raise RewardServiceError(self.url, f"POST {self.url}{path} returned {len(scores) if isinstance(scores, list) else 'no'} "
                                     f"'{field_}' for {len(responses)} items", retryable=False)
        vals = []
        for s in scores:
            if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
                raise RewardServiceError(self.url, f"POST {self.url}{path} returned a non-finite or non-numeric "
                                         f"score {s!r}", retryable=False)
            vals.append(float(s))
        return vals


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
