"""POST /v1/chat/completions, POST /v1/completions, GET /v1/models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import ORJSONResponse, StreamingResponse

from modelfleet.server.cache import cache_key, cacheable
from modelfleet.server.errors import RouterError, error_body
from modelfleet.server.registry import ModelRoute
from modelfleet.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from modelfleet.server.services import Services, services_of
from modelfleet.server.streaming import Assembler, replay, sse

router = APIRouter()

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
CACHE_HIT = {"x-modelfleet-cache": "hit"}


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


async def relay(
    services: Services,
    upstream: httpx.Response,
    route: ModelRoute,
    finish: AsyncExitStack,
    client_wants_usage: bool,
    assembler: Assembler | None,
    key: str | None,
) -> AsyncIterator[bytes]:
    """Forward each upstream event as it arrives; an upstream failure becomes an SSE error event.

    `finish` holds the model's slot and the request's metrics; it closes when the stream ends,
    including when the client goes away (Starlette cancels this generator).  The upstream is
    always asked for usage; the usage chunk reaches the client only if it asked for it.
    """
    async with finish:
        try:
            async for payload in services.backend.events(upstream):
                if payload == b"[DONE]":
                    if assembler is not None and key is not None and services.cache is not None:
                        complete = assembler.result()
                        if complete is not None:
                            services.cache.store(key, complete)
                    yield sse(payload)
                    continue
                chunk = orjson.loads(payload)
                chunk["model"] = route.name
                if assembler is not None:
                    assembler.add(chunk)
                if chunk.get("usage") and not chunk.get("choices") and not client_wants_usage:
                    continue
                yield sse(orjson.dumps(chunk))
        except httpx.HTTPError:
            services.metrics.upstream_errors.labels(model=route.name, code="mid_stream").inc()
            error = error_body(f"The backend for `{route.name}` failed mid-stream.", "upstream_error", "upstream_error")
            yield sse(orjson.dumps(error))
            yield sse(b"[DONE]")


@asynccontextmanager
async def observed(services: Services, model: str, route_label: str) -> AsyncIterator[None]:
    """Count the request by status class and time it, whatever way it ends."""
    started = time.monotonic()
    status_class = "2xx"
    try:
        yield
    except RouterError as error:
        status_class = f"{error.status // 100}xx"
        if error.type == "upstream_error":
            services.metrics.upstream_errors.labels(model=model, code=error.code or "unknown").inc()
        raise
    except asyncio.CancelledError:
        status_class = "cancelled"  # the client went away
        raise
    except BaseException:
        status_class = "5xx"
        raise
    finally:
        services.metrics.requests.labels(model=model, route=route_label, status_class=status_class).inc()
        services.metrics.duration.labels(model=model, route=route_label).observe(time.monotonic() - started)


def wants_cache(http_request: Request, services: Services, body: dict[str, Any]) -> bool:
    directives = http_request.headers.get("cache-control", "").lower()
    return (
        services.cache is not None and "no-cache" not in directives and "no-store" not in directives and cacheable(body)
    )


async def forward(http_request: Request, request: SamplingFields, path: str) -> Any:
    services = services_of(http_request)
    route = services.registry.resolve(request.model)
    body = upstream_body(request, route, services)
    queue = services.queues[route.name]
    client_wants_usage = bool(request.stream_options and request.stream_options.include_usage)
    key = cache_key(route.name, path, body) if wants_cache(http_request, services, body) else None
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(observed(services, route.name, path))
        if key is not None and services.cache is not None:
            if request.stream:
                cached = services.cache.get(key)
                if cached is not None:
                    services.metrics.cache_lookups.labels(model=route.name, result="hit").inc()
                    events = list(replay(cached, client_wants_usage))
                    headers = {**SSE_HEADERS, **CACHE_HIT}
                    return StreamingResponse(iter(events), media_type="text/event-stream", headers=headers)
                services.metrics.cache_lookups.labels(model=route.name, result="miss").inc()
            else:

                async def compute() -> dict[str, Any]:
                    async with queue.slot(route.request_timeout_seconds):
                        return await services.backend.complete(route, path, body)

                result, how = await services.cache.get_or_compute(key, compute)
                services.metrics.cache_lookups.labels(model=route.name, result=how).inc()
                return ORJSONResponse({**result, "model": route.name}, headers={"x-modelfleet-cache": how})
        await stack.enter_async_context(queue.slot(route.request_timeout_seconds))
        if request.stream:
            upstream_request = {**body, "stream_options": {"include_usage": True}}
            upstream = await services.backend.open_stream(route, path, upstream_request)
            assembler = Assembler(chat=path.endswith("/chat/completions")) if key is not None else None
            # The slot and the metrics now belong to the stream: it releases them when it ends.
            finish = stack.pop_all()
            return StreamingResponse(
                relay(services, upstream, route, finish, client_wants_usage, assembler, key),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
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
