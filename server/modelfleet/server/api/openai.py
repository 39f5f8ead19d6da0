"""POST /v1/chat/completions, POST /v1/completions, GET /v1/models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import ORJSONResponse, StreamingResponse

from modelfleet.server.errors import RouterError, error_body
from modelfleet.server.registry import ModelRoute
from modelfleet.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from modelfleet.server.services import Services, services_of

router = APIRouter()

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def upstream_body(request: SamplingFields, route: ModelRoute, services: Services) -> dict[str, Any]:
    """The request as the backend should see it: its model name, and max_tokens bounded by policy."""
    body = request.model_dump(exclude_none=True, exclude={"n"})
    requested = body.pop("max_completion_tokens", None) or body.get("max_tokens")
    cap = services.settings.max_tokens_cap
    if requested is not None and requested > cap:
        raise RouterError(400, f"max_tokens is {requested}, above this server's limit of {cap}.",
                          code="max_tokens_exceeded", param="max_tokens")  # fmt: skip
    body["max_tokens"] = requested or services.settings.default_max_tokens
    body["model"] = route.upstream_model
    return body


async def relay(services: Services, upstream: httpx.Response, route: ModelRoute) -> AsyncIterator[bytes]:
    """Forward each upstream event as it arrives; an upstream failure becomes an SSE error event."""
    renamed = route.upstream_model != route.name
    try:
        async for payload in services.backend.events(upstream):
            if renamed and payload != b"[DONE]":
                chunk = orjson.loads(payload)
                chunk["model"] = route.name
                payload = orjson.dumps(chunk)
            yield b"data: " + payload + b"\n\n"
    except httpx.HTTPError:
        error = error_body(f"The backend for `{route.name}` failed mid-stream.", "upstream_error", "upstream_error")
        yield b"data: " + orjson.dumps(error) + b"\n\n"
        yield b"data: [DONE]\n\n"


async def forward(http_request: Request, request: SamplingFields, path: str) -> Any:
    services = services_of(http_request)
    route = services.registry.resolve(request.model)
    body = upstream_body(request, route, services)
    if request.stream:
        upstream = await services.backend.open_stream(route, path, body)
        return StreamingResponse(relay(services, upstream, route), media_type="text/event-stream", headers=SSE_HEADERS)
    result = await services.backend.complete(route, path, body)
    result["model"] = route.name
    return ORJSONResponse(result)


@router.post("/v1/chat/completions")
async def chat_completions(request: ChatCompletionRequest, http_request: Request) -> Any:
    return await forward(http_request, request, "/v1/chat/completions")


@router.post("/v1/completions")
async def completions(request: CompletionRequest, http_request: Request) -> Any:
    return await forward(http_request, request, "/v1/completions")


@router.get("/v1/models")
async def list_models(http_request: Request) -> ORJSONResponse:
    names = services_of(http_request).registry.names()
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "modelfleet"} for name in names]
    return ORJSONResponse({"object": "list", "data": data})
