"""The OpenAI API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from modelfleet.server import admission, relay
from modelfleet.server.backends.base import Kind
from modelfleet.server.errors import GENERATION_ERRORS, OrjsonResponse, error_body, error_responses
from modelfleet.server.relay import Heartbeat, StreamFailure, StreamPlan
from modelfleet.server.schemas import (
    OPENAI_STREAM,
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    ModelList,
    SamplingFields,
    TextCompletion,
)
from modelfleet.server.services import services_of
from modelfleet.server.streaming import PING, sse

router = APIRouter(tags=["openai"])

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def openai_events(plan: StreamPlan, include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI's SSE framing: one `data:` per chunk, the usage chunk only if asked for, then [DONE]."""
    async for event in plan.events:
        if isinstance(event, Heartbeat):
            yield PING
        elif isinstance(event, StreamFailure):
            error = event.error
            yield sse(orjson.dumps(error_body(error.message, error.type, error.code, error.param)))
            break
        elif event.get("choices") or include_usage:
            yield sse(orjson.dumps(event))
    yield sse(b"[DONE]")


async def answer(http_request: Request, request: SamplingFields, kind: Kind, route: str) -> Any:
    services = services_of(http_request)
    generation = await admission.prepare(services, http_request, request, kind, route, use_cache=request.use_cache,
                                        allow_remote=request.allow_remote)  # fmt: skip
    headers = generation.response_headers()
    if request.stream:
        plan = await relay.stream(generation)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        headers.update(SSE_HEADERS)
        headers["x-modelfleet-cache"] = "hit" if plan.cached else "miss"
        return StreamingResponse(openai_events(plan, include_usage), media_type="text/event-stream", headers=headers)
    result, lookup = await relay.complete(generation)
    headers["x-modelfleet-cache"] = lookup
    return OrjsonResponse(result, headers=headers)


@router.post(
    "/v1/chat/completions",
    responses={200: {"model": ChatCompletion, "content": OPENAI_STREAM}, **GENERATION_ERRORS},
    response_description="The completion, or with `stream: true` its chunks as server-sent events.",
)
async def chat_completions(request: ChatCompletionRequest, http_request: Request) -> Any:
    return await answer(http_request, request, "chat", "/v1/chat/completions")


@router.post(
    "/v1/completions",
    responses={200: {"model": TextCompletion, "content": OPENAI_STREAM}, **GENERATION_ERRORS},
    response_description="The completion, or with `stream: true` its chunks as server-sent events.",
)
async def completions(request: CompletionRequest, http_request: Request) -> Any:
    return await answer(http_request, request, "completion", "/v1/completions")


@router.get("/v1/models", responses={200: {"model": ModelList}, **error_responses(401)})
async def list_models(http_request: Request) -> OrjsonResponse:
    services = services_of(http_request)
    services.keys.authenticate(http_request)
    data: list[dict[str, object]] = []
    for model in services.registry.models():
        data.append({"id": model.name, "object": "model", "created": 0, "owned_by": "modelfleet"})
        # A LoRA adapter is a model of its own to clients; `parent` names its base, as vLLM says it.
        data.extend({"id": adapter, "object": "model", "created": 0, "owned_by": "modelfleet", "parent": model.name}
                    for adapter in model.spec.adapters)  # fmt: skip
    return OrjsonResponse({"object": "list", "data": data})
