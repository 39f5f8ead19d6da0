"""The Responses-style API, POST /v1/responses: JSON, or SSE events response.created ... response.completed.

Every response carries `timings` (queue wait, backend time, total, in milliseconds) and `cached`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from modelfleet.server import pipeline
from modelfleet.server.api.openai import SSE_HEADERS
from modelfleet.server.errors import GENERATION_ERRORS, OrjsonResponse
from modelfleet.server.pipeline import Generation, Heartbeat, StreamFailure, StreamPlan
from modelfleet.server.schemas import ChatCompletionRequest, ResponseObject, ResponsesRequest, event_stream, json_data
from modelfleet.server.services import services_of
from modelfleet.server.streaming import PING, sse

router = APIRouter(tags=["responses"])

# The events of a streamed response, and the keys each one's data carries besides `type` and `sequence_number`.
EVENTS: dict[str, list[str]] = {
    "response.created": ["response"],
    "response.in_progress": ["response"],
    "response.output_item.added": ["output_index", "item"],
    "response.content_part.added": ["item_id", "output_index", "content_index", "part"],
    "response.output_text.delta": ["item_id", "output_index", "content_index", "delta"],
    "response.output_text.done": ["item_id", "output_index", "content_index", "text"],
    "response.content_part.done": ["item_id", "output_index", "content_index", "part"],
    "response.output_item.done": ["output_index", "item"],
    "response.completed": ["response"],
    "response.incomplete": ["response"],
    "error": ["code", "message", "param"],
    "response.failed": ["response"],
}
RESPONSE_EVENTS = event_stream(
    "`stream: true`: OpenAI's Responses events, from response.created to response.completed (or "
    "response.incomplete); a failure mid-stream sends `error` then response.failed.",
    {
        "type": "object",
        "required": ["event", "data"],
        "anyOf": [
            {
                "properties": {
                    "event": {"const": name},
                    "data": json_data({
                        "type": "object",
                        "required": ["type", "sequence_number", *keys],
                        "properties": {"type": {"const": name}, "sequence_number": {"type": "integer"}},
                    }),
                }
            }
            for name, keys in EVENTS.items()
        ],
    },
)  # fmt: skip


def as_chat_request(request: ResponsesRequest) -> ChatCompletionRequest:
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
    else:
        for message in request.input:
            content = message.content
            if isinstance(content, list):
                content = "".join(str(part.get("text", "")) for part in content)
            messages.append({"role": message.role, "content": content})
    return ChatCompletionRequest.model_validate(
        {"model": request.model, "messages": messages, "max_tokens": request.max_output_tokens,
         "temperature": request.temperature, "top_p": request.top_p, "seed": request.seed}
    )  # fmt: skip


def timings(generation: Generation) -> dict[str, float]:
    return {
        "queue_ms": round(generation.queue_seconds * 1000, 3),
        "backend_ms": round(generation.backend_seconds * 1000, 3),
        "total_ms": round((time.monotonic() - generation.started) * 1000, 3),
    }


def response_object(
    response_id: str, message_id: str, generation: Generation, request: ResponsesRequest, text: str | None,
    finish_reason: str | None, usage: dict[str, Any] | None, cached: bool,
) -> dict[str, Any]:  # fmt: skip
    done = text is not None
    status = "in_progress" if not done else ("incomplete" if finish_reason == "length" else "completed")
    output = []
    if done:
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
        output.append({"type": "message", "id": message_id, "status": "completed", "role": "assistant",
                       "content": [part]})  # fmt: skip
    body: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": generation.name,
        "output": output,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "usage": None,
        "cached": cached,
    }
    if usage:
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        body["usage"] = {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
                         "input_tokens_details": {"cached_tokens": 0},
                         "output_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip
    if done:
        body["timings"] = timings(generation)
    return body


async def response_events(plan: StreamPlan, generation: Generation, request: ResponsesRequest) -> AsyncIterator[bytes]:
    response_id, message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    sequence = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal sequence
        sequence += 1
        return sse(orjson.dumps({"type": kind, "sequence_number": sequence, **fields}), event=kind)

    initial = response_object(response_id, message_id, generation, request, None, None, None, plan.cached)
    yield event("response.created", response=initial)
    yield event("response.in_progress", response=initial)
    item = {"type": "message", "id": message_id, "status": "in_progress", "role": "assistant", "content": []}
    yield event("response.output_item.added", output_index=0, item=item)
    part = {"type": "output_text", "text": "", "annotations": []}
    yield event("response.content_part.added", item_id=message_id, output_index=0, content_index=0, part=part)
    parts: list[str] = []
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    async for streamed in plan.events:
        if isinstance(streamed, Heartbeat):
            yield PING
            continue
        if isinstance(streamed, StreamFailure):
            error = streamed.error
            failed = {**initial, "status": "failed", "error": {"code": error.code, "message": error.message}}
            # OpenAI's error event: its `type` is "error", like the event's name (not the error's type).
            yield event("error", code=error.code, message=error.message, param=error.param)
            yield event("response.failed", response=failed)
            return
        if streamed.get("usage"):
            usage = streamed["usage"]
        for choice in streamed.get("choices") or ():
            delta = (choice.get("delta") or {}).get("content")
            if delta:
                parts.append(delta)
                yield event("response.output_text.delta", item_id=message_id, output_index=0, content_index=0,
                            delta=delta)  # fmt: skip
            finish_reason = choice.get("finish_reason") or finish_reason
    text = "".join(parts)
    final = response_object(response_id, message_id, generation, request, text, finish_reason, usage, plan.cached)
    yield event("response.output_text.done", item_id=message_id, output_index=0, content_index=0, text=text)
    done_part = {"type": "output_text", "text": text, "annotations": []}
    yield event("response.content_part.done", item_id=message_id, output_index=0, content_index=0, part=done_part)
    yield event("response.output_item.done", output_index=0, item=final["output"][0])
    yield event("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)


@router.post(
    "/v1/responses",
    responses={200: {"model": ResponseObject, "content": RESPONSE_EVENTS}, **GENERATION_ERRORS},
    response_description="The response object, or with `stream: true` its events as server-sent events.",
)
async def create_response(request: ResponsesRequest, http_request: Request) -> Any:
    services = services_of(http_request)
    generation = await pipeline.prepare(services, http_request, as_chat_request(request), "chat", "/v1/responses",
                                        use_cache=request.use_cache, allow_remote=request.allow_remote)  # fmt: skip
    headers = generation.response_headers()
    if request.stream:
        plan = await pipeline.stream(generation)
        return StreamingResponse(response_events(plan, generation, request), media_type="text/event-stream",
                                 headers={**headers, **SSE_HEADERS})  # fmt: skip
    result, lookup = await pipeline.complete(generation)
    choice = result["choices"][0]
    body = response_object(
        f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", generation, request,
        choice["message"].get("content") or "", choice.get("finish_reason"), result.get("usage"),
        lookup in ("hit", "coalesced"),
    )  # fmt: skip
    return OrjsonResponse(body, headers=headers)
