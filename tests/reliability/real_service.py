"""The real reward service as a killable, restartable child process, and a wire recorder for the client.

``Serve`` is `salmon serve` (the real entry point) on a fixed loopback port: ``kill()`` SIGKILLs it
the way an OOM killer or a lost node does, and a new ``Serve`` on the same port is the restart an
orchestrator makes. ``Wire`` is an httpx transport that records, on the client's side, every attempt
the reward client makes and what the service answered, so a test can compare a run's rewards with
the service's own responses without putting anything inside the service.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx

from tests.reliability.helpers import ServeProcess as Serve  # noqa: F401 - the tests' name for it

RULE_PATTERN, RULE_PENALTY = r"[aeiou]", 0.01
RULE_SETTINGS = {"scorer": "rule", "rule_pattern": RULE_PATTERN, "rule_length_penalty": RULE_PENALTY,
                 "default_principle_set": "concise", "watch_registry": False}


class Wire(httpx.AsyncHTTPTransport):
    """Records every attempt: ``calls`` = [{"method", "path", "step", "t0", "t1", "status", "retry_after",
    "error", "request", "response"}]; ``started`` is set each time a request goes out."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []
        self.in_flight: list[dict[str, Any]] = []
        self.started = threading.Condition()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        call: dict[str, Any] = {"method": request.method, "path": request.url.path,
                                "step": request.headers.get("x-salmon-step"), "t0": time.monotonic(),
                                "request": _json(request.content), "status": None, "error": None}
        with self.started:
            self.in_flight.append(call)
            self.started.notify_all()
        try:
            resp = await super().handle_async_request(request)
            await resp.aread()
        except Exception as e:
            call["error"] = type(e).__name__
            raise
        else:
            call.update(status=resp.status_code, retry_after=resp.headers.get("retry-after"),
                        response=_json(resp.content))
            return resp
        finally:
            call["t1"] = time.monotonic()
            with self.started:
                self.in_flight.remove(call)
                self.calls.append(call)

    def wait_in_flight(self, pred, timeout: float) -> dict[str, Any]:
        """Block until a request matching ``pred`` is in flight; returns it."""
        deadline = time.monotonic() + timeout
        with self.started:
            while True:
                for c in self.in_flight:
                    if pred(c):
                        return c
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no matching request went out")
                self.started.wait(left)

    def scored(self, path: str = "/v1/score") -> list[dict[str, Any]]:
        return [c for c in self.calls if c["path"] == path and c["status"] == 200]


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("utf-8", "replace")
