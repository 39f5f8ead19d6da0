"""The APIs our users come from: POST /v1/generate, POST /v1/generate/stream and POST /infer.

They are thin translations onto the same pipeline as the OpenAI API, so they get the same
queueing, cache, limits and metrics.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from modelfleet.server import admission, relay
from modelfleet.server.admission import Generation
from modelfleet.server.api.openai import SSE_HEADERS
from modelfleet.server.errors import GENERATION_ERRORS, MODEL_REQUIRED, OrjsonResponse, error_body
from modelfleet.server.relay import Heartbeat, StreamFailure, StreamPlan
from modelfleet.server.schemas import (
    ERROR_DETAIL_REF,
    ChatCompletionRequest,
    GenerateAnswer,
    GenerateRequest,
    InferAnswer,
    InferRequest,
    event_stream,
    json_data,
)
from modelfleet.server.services import Services, services_of
from modelfleet.server.streaming import PING, sse

router = APIRouter(tags=["compat"])

TOKEN_EVENTS = event_stream(
    '{"token", "done": false, "cached"} per chunk, then {"done": true, "model", "latency_ms", "prompt_tokens", '
    '"completion_tokens", ...}; a failure mid-stream ends with {"done": true, "error": {...}}.',
    {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"const": "message"},
            "data": json_data({
                "type": "object",
                "required": ["done", "cached"],
                "properties": {"token": {"type": "string"}, "done": {"type": "boolean"}, "cached": {"type": "boolean"},
                               "latency_ms": {"type": "number"}, "error": ERROR_DETAIL_REF},
                "anyOf": [
                    {"properties": {"done": {"const": False}}, "required": ["token"]},
                    {"properties": {"done": {"const": True}}, "required": ["latency_ms"]},
                ],
            }),
        },
    },
)  # fmt: skip


def model_for(request: GenerateRequest, services: Services) -> str:
    name = request.model or services.settings.default_model
    if name is None:
        names = services.registry.names()
        if len(names) != 1:
            raise MODEL_REQUIRED("Name a model: this router serves several and has no default model.", param="model")
        name = names[0]
    return name


def as_chat_request(request: GenerateRequest, services: Services) -> ChatCompletionRequest:
    messages = [{"role": "system", "content": request.system}] if request.system else []
    messages.append({"role": "user", "content": request.prompt})
    return ChatCompletionRequest.model_validate(
        {"model": model_for(request, services), "messages": messages, "max_tokens": request.max_tokens,
         "temperature": request.temperature, "seed": request.seed}
    )  # fmt: skip


async def start(http_request: Request, request: GenerateRequest, route: str) -> Generation:
    services = services_of(http_request)
    return await admission.prepare(services, http_request, as_chat_request(request, services), "chat", route,
                                  use_cache=request.use_cache)  # fmt: skip


def latency_ms(generation: Generation) -> float:
    return round((time.monotonic() - generation.started) * 1000, 3)


def answer_text(result: dict[str, Any]) -> str:
    content = result["choices"][0]["message"].get("content")
    return content if isinstance(content, str) else ""


@router.post("/v1/generate", responses={200: {"model": GenerateAnswer}, **GENERATION_ERRORS})
async def generate(request: GenerateRequest, http_request: Request) -> OrjsonResponse:
    generation = await start(http_request, request, "/v1/generate")
    result, lookup = await relay.complete(generation)
    usage = result.get("usage") or {}
    body = {
        "text": answer_text(result),
        "model": generation.answer_name,
        "cached": lookup in ("hit", "coalesced"),
        "latency_ms": latency_ms(generation),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "total_tokens": usage.get("total_tokens", 0),
        # llm-inference-server's names: it estimated them; these are the backend's own counts.
        "prompt_tokens_approx": usage.get("prompt_tokens", 0),
        "completion_tokens_approx": usage.get("completion_tokens", 0),
    }
    return OrjsonResponse(body, headers=generation.response_headers())


async def token_events(plan: StreamPlan, generation: Generation) -> AsyncIterator[bytes]:
    """{"token", "done": false, "cached"} per chunk, then {"done": true, "latency_ms", ...}."""
    usage: dict[str, Any] = {}
    async for event in plan.events:
        if isinstance(event, Heartbeat):
            yield PING
            continue
        if isinstance(event, StreamFailure):
            error = event.error
            failure = {"done": True, "cached": plan.cached, "latency_ms": latency_ms(generation),
                       **error_body(error.message, error.type, error.code)}  # fmt: skip
            yield sse(orjson.dumps(failure))
            return
        usage = event.get("usage") or usage
        for choice in event.get("choices") or ():
            token = (choice.get("delta") or {}).get("content")
            if token:
                yield sse(orjson.dumps({"token": token, "done": False, "cached": plan.cached}))
    final = {"token": "", "done": True, "cached": plan.cached, "model": generation.answer_name,
             "latency_ms": latency_ms(generation), "prompt_tokens": usage.get("prompt_tokens", 0),
             "completion_tokens": usage.get("completion_tokens", 0)}  # fmt: skip
    yield sse(orjson.dumps(final))


@router.post(
    "/v1/generate/stream",
    response_class=StreamingResponse,
    responses={200: {"content": TOKEN_EVENTS}, **GENERATION_ERRORS},
    response_description="The tokens as server-sent events.",
)
async def generate_stream(request: GenerateRequest, http_request: Request) -> StreamingResponse:
    generation = await start(http_request, request, "/v1/generate/stream")
    plan = await relay.stream(generation)
    return StreamingResponse(token_events(plan, generation), media_type="text/event-stream",
                             headers={**generation.response_headers(), **SSE_HEADERS})  # fmt: skip


@router.post("/infer", responses={200: {"model": InferAnswer}, **GENERATION_ERRORS})
async def infer(request: InferRequest, http_request: Request) -> OrjsonResponse:
    generation = await start(http_request, request, "/infer")
    result, lookup = await relay.complete(generation)
    body = {"response": answer_text(result), "latency_ms": latency_ms(generation),
            "cached": lookup in ("hit", "coalesced"), "model": generation.answer_name}  # fmt: skip
    return OrjsonResponse(body, headers=generation.response_headers())
