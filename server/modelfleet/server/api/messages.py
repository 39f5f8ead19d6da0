"""The Anthropic Messages API: POST /v1/messages and POST /v1/messages/count_tokens.

Passed through to backends that serve it (Ollama, vLLM), through the same admission and relay as chat
completions; errors on these paths have Anthropic's shape (errors.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from modelfleet.server import admission, relay
from modelfleet.server.errors import MESSAGES_ERRORS, OrjsonResponse, anthropic_error_body
from modelfleet.server.relay import Heartbeat, StreamFailure, StreamPlan
from modelfleet.server.schemas import MESSAGES_STREAM, CountTokensRequest, MessageAnswer, MessagesRequest, TokenCount
from modelfleet.server.services import services_of
from modelfleet.server.streaming import PING, sse

router = APIRouter(tags=["anthropic"])

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
ROUTE = "/v1/messages"


async def anthropic_events(plan: StreamPlan) -> AsyncIterator[bytes]:
    """Anthropic's SSE framing: `event: <type>` and its data; a failure is an `error` event, the stream's last."""
    async for event in plan.events:
        if isinstance(event, Heartbeat):
            yield PING  # a comment: waiting in line, before message_start
        elif isinstance(event, StreamFailure):
            yield sse(orjson.dumps(anthropic_error_body(event.error)), event="error")
            break
        else:
            yield sse(orjson.dumps(event), event=str(event.get("type")))


@router.post(
    ROUTE,
    responses={200: {"model": MessageAnswer, "content": MESSAGES_STREAM}, **MESSAGES_ERRORS},
    response_description="The message, or with `stream: true` Anthropic's server-sent events.",
)
async def create_message(request: MessagesRequest, http_request: Request) -> Any:
    services = services_of(http_request)
    # Streams are not cached: a stream of tool calls and thinking cannot be rebuilt exactly for a replay.
    generation = await admission.prepare(services, http_request, request, "messages", ROUTE,
                                         use_cache=request.use_cache and not request.stream,
                                         allow_remote=request.allow_remote)  # fmt: skip
    headers = generation.response_headers()
    if request.stream:
        plan = await relay.stream(generation)
        headers.update(SSE_HEADERS)
        headers["x-modelfleet-cache"] = "bypass"
        return StreamingResponse(anthropic_events(plan), media_type="text/event-stream", headers=headers)
    result, lookup = await relay.complete(generation)
    headers["x-modelfleet-cache"] = lookup
    return OrjsonResponse(result, headers=headers)


@router.post(
    f"{ROUTE}/count_tokens",
    responses={200: {"model": TokenCount}, **MESSAGES_ERRORS},
    response_description="The input tokens of the request, as the model's backend counts them.",
)
async def count_tokens(request: CountTokensRequest, http_request: Request) -> Any:
    services = services_of(http_request)
    model, body = admission.prepare_count(services, http_request, request)
    return OrjsonResponse(await relay.count_tokens(services, model, body))
