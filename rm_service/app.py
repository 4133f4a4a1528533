"""create_app(settings): wiring, lifespan, middleware and the one error mapping.

The model loads in a background thread at start, so /healthz answers at once and /readyz says
"loading" until the scorer is ready (orchestrators wait on /readyz). Every error leaves as
``{"error": {"message", "type", "param", "code"}}`` with a message that says what to fix.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rm_service.api import router
from rm_service.errors import ServiceError, error_body
from rm_service.serving import ScoreService
from rm_service.settings import ServiceSettings

log = logging.getLogger("salmon.rm_service")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for e in exc.errors()[:5]:
        # Union members of a validated type show up as 'function-after[...]' in loc: not a field name.
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and not str(x).startswith("function-")]
        path = ".".join(loc) or "body"
        if e.get("type") == "json_invalid":
            path = f"body (at character {'.'.join(loc)})" if loc else "body"
        first = first or path
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        if e.get("type") == "missing":
            msg = "is required"
        elif e.get("type") == "extra_forbidden":
            msg = "is not a known field"
        elif e.get("type") == "json_invalid":
            msg = f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})"
        parts.append(f"{path}: {msg}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else ""), first


class BodyLimitMiddleware:
    """413 for bodies over the limit, checked on Content-Length and on the bytes actually read."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, limited_receive, send)
        except Exception as e:
            if not _is_too_large(e):
                raise
            await self._reject(send)

    async def _reject(self, send):
        await too_large_response(self.max_bytes)({"type": "http"}, None, send)


def too_large_response(max_bytes: int) -> JSONResponse:
    return JSONResponse(error_body(413, "payload_too_large", f"request body over the limit of {max_bytes} bytes; "
                                   "send fewer or shorter items per request"), status_code=413)


class _TooLarge(Exception):
    pass


def _is_too_large(exc: BaseException | None) -> bool:
    # The http middleware reads the body in a task group, so the signal may arrive wrapped in a group.
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(_TooLarge)[1] is None
    return isinstance(exc, _TooLarge)


def create_app(settings: ServiceSettings | None = None, service: ScoreService | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    service = service or ScoreService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.num_threads:
            import torch

            torch.set_num_threads(settings.num_threads)
        loader = threading.Thread(target=service.start, name="salmon-model-load", daemon=True)
        loader.start()
        yield
        service.stop()

    app = FastAPI(title="salmon reward-model service", version="1", lifespan=lifespan,
                  description="Scores (prompt, response) pairs against written principles.")
    app.state.service = service
    app.include_router(router)

    @app.exception_handler(ServiceError)
    async def _salmon_error(request: Request, exc: ServiceError):
        return JSONResponse(error_body(exc.status, exc.type, exc.message, exc.param), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return JSONResponse(error_body(422, "invalid_request", msg, param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if _is_too_large(exc.__cause__):
            # FastAPI's body parser turns any exception while reading into a 400; a streamed body cut
            # off by BodyLimitMiddleware is the client's oversize body: 413, as with a Content-Length.
            return too_large_response(settings.max_body_bytes)
        if exc.status_code == 400:
            # FastAPI's body parser fails this way on JSON it cannot decode other than by syntax
            # (e.g. nested beyond the parser's recursion limit): the client's input, so 422 like any bad body.
            return JSONResponse(error_body(422, "invalid_request", "the body could not be parsed as JSON (is it "
                                           "nested too deeply?); send one JSON object as the endpoint's schema "
                                           "describes", "body"), status_code=422)
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(exc.status_code, "http_error", msg), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body(500, "internal_error", f"internal error: {type(exc).__name__}"),
                            status_code=500)

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        service.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    return app
