"""Thin routes: parse, check auth, call serving, return protocol objects."""

from __future__ import annotations

import hmac
import json
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

from principles.schema import PrincipleSet
from rm_service.errors import Forbidden, InvalidRequest, Unauthorized
from rm_service.protocol import (
    ClassificationResponse,
    ClassifyRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ModelInfo,
    PoolingRequest,
    PoolingResponse,
    PrincipleSetInfo,
    PrincipleSetList,
    ReloadRequest,
    ReloadResponse,
    RewardRequest,
    RewardResponse,
    ScoreRequest,
    ScoreResponse,
)
from rm_service.serving import ScoreService

ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 413, 422, 429, 503)}


def get_service(request: Request) -> ScoreService:
    return request.app.state.service


ServiceDep = Annotated[ScoreService, Depends(get_service)]


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _matches(given: str | None, secret) -> bool:
    # Constant-time compare: the time taken does not leak how much of the key was right.
    return given is not None and hmac.compare_digest(given.encode(), secret.get_secret_value().encode())


def require_api_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    st = request.app.state.service.settings
    if st.api_key is None:
        return
    token = _bearer(authorization)
    if token is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <SALMON_API_KEY>'")
    if not (_matches(token, st.api_key) or (st.admin_key is not None and _matches(token, st.admin_key))):
        raise Unauthorized("invalid API key")


def require_admin_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    st = request.app.state.service.settings
    token = _bearer(authorization)
    if st.admin_key is None:
        if st.api_key is not None:
            # With an API key but no admin key, writes need the API key; set SALMON_ADMIN_KEY to separate them.
            require_api_key(request, authorization)
        return
    if token is None:
        raise Unauthorized("missing admin key: send 'Authorization: Bearer <SALMON_ADMIN_KEY>'")
    if not _matches(token, st.admin_key):
        if st.api_key is not None and _matches(token, st.api_key):
            raise Forbidden("this endpoint needs the admin key (SALMON_ADMIN_KEY), not the API key")
        raise Unauthorized("invalid admin key")


api_key = [Depends(require_api_key)]
admin_key = [Depends(require_admin_key)]
router = APIRouter(responses=ERRORS)


@router.post("/v1/score", response_model=ScoreResponse, dependencies=api_key)
async def score(req: ScoreRequest, service: ServiceDep,
                x_score_mode: Annotated[str | None, Header()] = None) -> ScoreResponse:
    # The header lets a client that sends no 'mode' field (e.g. through its headers= argument) pick one.
    return await service.score(req, x_score_mode)


@router.post("/v1/generate", response_model=GenerateResponse, dependencies=api_key,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "JSON, or with stream true server-sent events: 'segment' "
                              "({index, text}) per committed piece, then 'done' (this response) or 'error'."}})
async def generate(req: GenerateRequest, service: ServiceDep):
    """RAIN (search: rain) or plain sampling (search: none) under the request's principles."""
    if req.stream:
        events = await service.generation.stream(req)  # validation errors leave before the stream starts
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await service.generation.generate(req)


@router.post("/get_reward", response_model=RewardResponse, dependencies=api_key)
async def get_reward(req: RewardRequest, service: ServiceDep, response: Response,
                     x_principle_set: Annotated[str | None, Header()] = None) -> RewardResponse:
    out, version = await service.get_reward(req, x_principle_set)
    response.headers["X-Model-Version"] = version
    return out


@router.post("/classify", response_model=ClassificationResponse, dependencies=api_key)
async def classify(req: ClassifyRequest, service: ServiceDep, response: Response,
                   x_principle_set: Annotated[str | None, Header()] = None) -> ClassificationResponse:
    """vLLM's classification API: ``{"model", "input": [text, ...]}`` -> ``{"data": [{"index", "probs": [score]}]}``."""
    out = await service.pool(req, x_principle_set, "classify")
    response.headers["X-Model-Version"] = out.model_version
    return out


@router.post("/pooling", response_model=PoolingResponse, dependencies=api_key)
async def pooling(req: PoolingRequest, service: ServiceDep, response: Response,
                  x_principle_set: Annotated[str | None, Header()] = None) -> PoolingResponse:
    """vLLM's pooling API: ``{"model", "input": [text, ...]}`` -> ``{"data": [{"index", "data": [score]}]}``."""
    out = await service.pool(req, x_principle_set, "pooling")
    response.headers["X-Model-Version"] = out.model_version
    return out


@router.get("/v1/principle-sets", response_model=PrincipleSetList, dependencies=api_key)
async def list_sets(service: ServiceDep) -> PrincipleSetList:
    return service.sets.list()


@router.get("/v1/principle-sets/{name}", dependencies=api_key)
async def get_set(name: str, service: ServiceDep) -> dict:
    s = service.sets.resolve(name)
    return {**s.canonical(), "hash": s.hash, "ref": s.ref}


def _principle_set_body() -> dict:
    """The PUT body's schema for the spec (the route parses the body itself, to word its own errors)."""
    schema = PrincipleSet.model_json_schema()
    principle = schema.pop("$defs")["Principle"]
    schema["properties"]["principles"]["items"] = principle
    schema["required"] = ["principles"]  # the name defaults to the URL's
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


@router.put("/v1/principle-sets/{name}", response_model=PrincipleSetInfo, dependencies=admin_key,
            responses={201: {"model": PrincipleSetInfo, "description": "Created"}},
            openapi_extra=_principle_set_body())
async def put_set(name: str, request: Request, response: Response, service: ServiceDep) -> PrincipleSetInfo:
    try:
        body = json.loads(await request.body())
        json.dumps(body, ensure_ascii=False).encode()  # a "\ud800" escape decodes, but is not text
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"body is not valid JSON: {e}", param="body") from None
    except UnicodeEncodeError:
        raise InvalidRequest("body contains an unpaired surrogate escape (e.g. \\ud800); send valid Unicode text",
                             param="body") from None
    except RecursionError:
        raise InvalidRequest("body is nested too deeply to parse; send a principle set object "
                             "{'name', 'description', 'principles': [...]}", param="body") from None
    info, created = service.sets.put(name, body)
    response.status_code = 201 if created else 200
    return info


@router.delete("/v1/principle-sets/{name}", status_code=204, dependencies=admin_key)
async def delete_set(name: str, service: ServiceDep) -> Response:
    service.sets.delete(name)
    return Response(status_code=204)


@router.get("/v1/model", response_model=ModelInfo, dependencies=api_key)
async def model_info(service: ServiceDep) -> ModelInfo:
    return service.model_info()


@router.post("/v1/admin/reload", response_model=ReloadResponse, dependencies=admin_key)
async def reload(service: ServiceDep, req: ReloadRequest | None = None) -> ReloadResponse:
    import asyncio

    return await asyncio.to_thread(service.models.reload, req.version if req else None)


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(service: ServiceDep, response: Response) -> dict:
    if service.ready:
        sc = service.models.scorer
        return {"status": "ready", "model_version": sc.version, "scorer": sc.kind}
    response.status_code = 503
    return {"status": "failed" if service.models.load_error else "loading", "error": service.models.load_error}


@router.get("/metrics", response_class=PlainTextResponse, dependencies=api_key)
async def metrics(service: ServiceDep) -> PlainTextResponse:
    st = service.models.prefix_cache.stats()
    service.metrics.cache_bytes.set(st["bytes"])
    return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")
