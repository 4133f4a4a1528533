"""Test doubles that speak the reward-service contract (docs/contract.md) over real HTTP.

``contract_app`` is a small FastAPI app implementing /v1/score, /v1/model, principle-set PUT/GET,
/get_reward and health with the rule scorer's formula (regex count minus a per-character
penalty), plus fault injection (scripted statuses, Retry-After). It lets the client and trainer
be tested independently of rm_service's scoring; the end-to-end tests also run against the real
rm_service app. Its errors are the service's own: raised as rm_service.errors types and rendered
by rm_service.app.error_body, so every error body is ``{"error": {"message", "type", "param",
"code"}}`` with the headers (Retry-After, WWW-Authenticate) the real service sends.

``Recorder`` is pure ASGI middleware that records every request and response body of ANY app
(the real service included), so tests can check what the service received and returned.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from principles.schema import PrincipleSetError, load_principle_set, parse_principle_set
from rm_service.app import error_body
from rm_service.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ScoringFailed,
    ServiceError,
    Unauthorized,
)

# The error type the real service raises for each status a test may script.
ERROR_FOR_STATUS: dict[int, type[ServiceError]] = {
    401: Unauthorized, 403: Forbidden, 404: NotFound, 413: PayloadTooLarge, 422: InvalidRequest,
    429: Overloaded, 500: ScoringFailed, 503: NotReady}


def service_error(status: int, message: str) -> ServiceError:
    """The error the real service would raise with ``status``; 502/504 (a proxy's) as a bare ServiceError."""
    cls = ERROR_FOR_STATUS.get(status)
    if cls is None:
        err = ServiceError(message)
        err.status = status
        return err
    return cls(message)


def error_response(exc: ServiceError) -> JSONResponse:
    """Exactly what rm_service.app's handler sends for ``exc``."""
    return JSONResponse(error_body(exc.status, exc.type, exc.message, exc.param), status_code=exc.status,
                        headers=exc.headers)


def rule_score(text: str, pattern: str, penalty: float) -> float:
    return float(len(re.findall(pattern, text, re.IGNORECASE))) - penalty * len(text)  # as rm_service's rule scorer


@dataclass
class Faults:
    """Scripted failures for /v1/score and /get_reward: pop one status per request while any remain."""

    statuses: list[int] = field(default_factory=list)
    retry_after: str | None = None
    delays_s: list[float] = field(default_factory=list)  # /v1/score: one stall per request, before answering
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next(self) -> int | None:
        with self.lock:
            return self.statuses.pop(0) if self.statuses else None

    def next_delay(self) -> float:
        with self.lock:
            return self.delays_s.pop(0) if self.delays_s else 0.0


def contract_app(*, pattern: str = r"[aeiou]", penalty: float = 0.01, max_items: int = 256,
                 faults: Faults | None = None, api_key: str | None = None, admin_key: str | None = None) -> FastAPI:
    app = FastAPI()
    sets: dict[str, Any] = {"concise": load_principle_set("concise")}
    faults = faults or Faults()
    app.state.sets, app.state.faults = sets, faults

    def denied(request: Request, admin: bool = False) -> JSONResponse | None:
        key = (admin_key or api_key) if admin else api_key
        if not key:
            return None
        got = request.headers.get("authorization", "")
        if not got:
            return error_response(Unauthorized("missing Authorization: Bearer key"))
        if got != f"Bearer {key}":
            return error_response(Forbidden("the key is not valid for this route"))
        return None

    def injected() -> JSONResponse | None:
        status = faults.next()
        if status is None:
            return None
        err = service_error(status, f"injected fault: HTTP {status} scripted by the test")
        if faults.retry_after and status in (429, 503):
            err.headers["Retry-After"] = faults.retry_after
        return error_response(err)

    @app.get("/readyz")
    @app.get("/healthz")
    def ready() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model")
    def model(request: Request):
        return denied(request) or {"model_version": "rule", "scorer": "rule",
                                   "limits": {"max_items": max_items, "max_principles": 32}}

    @app.put("/v1/principle-sets/{name}")
    async def put_set(name: str, request: Request):
        if (d := denied(request, admin=True)) is not None:
            return d
        try:
            pset = parse_principle_set(await request.json())
        except PrincipleSetError as e:
            return error_response(InvalidRequest(str(e)))
        if pset.name != name:
            return error_response(InvalidRequest(f"the name in the path ({name!r}) and the body ({pset.name!r}) "
                                                 "differ", param="name"))
        sets[name] = pset
        return {"name": name, "hash": pset.hash, "ref": pset.ref}

    @app.get("/v1/principle-sets/{name}")
    def get_set(name: str, request: Request):
        if (d := denied(request)) is not None:
            return d
        if name not in sets:
            return error_response(NotFound(f"unknown principle set {name!r}", param="name"))
        return {**sets[name].canonical(), "hash": sets[name].hash}

    @app.post("/v1/score")
    async def score(request: Request):
        if (stall := faults.next_delay()) > 0:
            await asyncio.sleep(stall)
        if (d := denied(request) or injected()) is not None:
            return d
        body = await request.json()
        items = body.get("items")
        if not isinstance(items, list) or not items:
            return error_response(InvalidRequest("items: give at least one item", param="items"))
        if len(items) > max_items:
            return error_response(PayloadTooLarge(f"{len(items)} items in one request; the limit is {max_items}. "
                                                  "Split the request", param="items"))
        ref = body.get("principle_set")
        set_hash = ""
        if body.get("principles") is None and ref:
            name, _, h = ref.partition("@")
            if name not in sets or (h and sets[name].hash != h):
                return error_response(NotFound(f"unknown principle set {ref!r}", param="principle_set"))
            set_hash = sets[name].hash
        scores = [rule_score(it["response"], pattern, penalty) for it in items]
        return {"scores": scores, "model_version": "rule", "principle_set_hash": set_hash,
                "usage": {"tokens": 0, "cached_tokens": 0}}

    @app.post("/get_reward")
    async def get_reward(request: Request):
        if (d := denied(request) or injected()) is not None:
            return d
        body = await request.json()
        rewards = [rule_score(q, pattern, penalty) for q in body["query"]]
        return {"rewards": rewards, "scores": rewards, "extra_logs": {}}

    return app


class Recorder:
    """ASGI middleware: ``calls`` = [{"method","path","headers","request","status","response"}]."""

    def __init__(self, app: Any):
        self.app = app
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        req_chunks: list[bytes] = []
        resp_chunks: list[bytes] = []
        status: list[int] = []

        async def recv():
            msg = await receive()
            if msg["type"] == "http.request":
                req_chunks.append(msg.get("body", b""))
            return msg

        async def snd(msg):
            if msg["type"] == "http.response.start":
                status.append(msg["status"])
            elif msg["type"] == "http.response.body":
                resp_chunks.append(msg.get("body", b""))
                if not msg.get("more_body", False):
                    # Record before the last byte leaves: once the client has its answer, the test may look.
                    self._record(scope, req_chunks, status, resp_chunks)
            await send(msg)

        await self.app(scope, recv, snd)

    def _record(self, scope, req_chunks, status, resp_chunks) -> None:
        call = {"method": scope["method"], "path": scope["path"],
                "headers": {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])},
                "request": _maybe_json(b"".join(req_chunks)), "status": status[0] if status else None,
                "response": _maybe_json(b"".join(resp_chunks))}
        with self._lock:
            self.calls.append(call)

    def scored(self, path: str = "/v1/score") -> list[dict[str, Any]]:
        with self._lock:
            return [c for c in self.calls if c["path"] == path and c["status"] == 200]


def _maybe_json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("utf-8", "replace")
