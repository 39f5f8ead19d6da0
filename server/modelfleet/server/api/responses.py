"""The Responses-style API, POST /v1/responses: JSON, or SSE events response.created ... response.completed.

Every response carries `timings` (queue wait, backend time, total, in milliseconds) and `cached`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from modelfleet.server import admission, relay
from modelfleet.server.admission import Generation
from modelfleet.server.api.openai import SSE_HEADERS
from modelfleet.server.errors import GENERATION_ERRORS, OrjsonResponse
from modelfleet.server.relay import Heartbeat, StreamFailure, StreamPlan
from modelfleet.server.schemas import ChatCompletionRequest, ResponseObject, ResponsesRequest, event_stream, json_data
from modelfleet.server.services import services_of
from modelfleet.server.streaming import PING, sse

router = APIRouter(tags=["responses"])
logger = logging.getLogger(__name__)

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
    "response.metrics": ["metrics"],
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
    # llm-pool's `decoding` fills in what the top-level fields leave unset.
    decoding = request.decoding.model_dump(exclude_none=True) if request.decoding is not None else {}
    beam_size = decoding.pop("beam_size", None)
    if beam_size not in (None, 1):
        logger.info("decoding.beam_size %s accepted and ignored: the backends here sample, they do not "
                    "search beams", beam_size)  # fmt: skip
    fields = {**decoding, **{key: value for key, value in {
        "max_tokens": request.max_output_tokens, "temperature": request.temperature, "top_p": request.top_p,
        "seed": request.seed}.items() if value is not None}}  # fmt: skip
    return ChatCompletionRequest.model_validate({"model": request.model, "messages": messages, **fields})


def milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def pool_metrics(generation: Generation, usage: dict[str, Any] | None) -> dict[str, Any]:
    """The `metrics` object of llm-pool's responses, in its names, null where the value is not known.

    Its nesting holds here: the backend call (inference) is inside the queue wait plus the call
    (engine), which is inside the whole handler (pool).
    """
    backend = generation.backend_seconds
    output_tokens = int((usage or {}).get("completion_tokens") or 0) if usage else None
    return {
        "backend_inference_wall_ms": milliseconds(backend),
        "engine_total_wall_ms": milliseconds(generation.queue_seconds + backend),
        "pool_total_wall_ms": milliseconds(time.monotonic() - generation.started),
        "engine_queue_wait_ms": milliseconds(generation.queue_seconds),
        "engine_tokenize_ms": None,
        "gpu_time_to_first_token_ms": milliseconds(generation.first_token_seconds),
        "engine_prompt_tokens": int(usage.get("prompt_tokens") or 0) if usage else None,
        "engine_output_tokens": output_tokens,
        "engine_tokens_per_second": round(output_tokens / backend, 3) if output_tokens and backend > 0 else None,
    }


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
        # `text` on the item too: llm-pool's clients read output[0].text.
        output.append({"type": "message", "id": message_id, "status": "completed", "role": "assistant",
                       "content": [part], "text": text})  # fmt: skip
    body: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": generation.answer_name,
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
        # llm-pool's shape: the text at the top level, and its metrics.
        body["output_text"] = text
        body["metrics"] = pool_metrics(generation, usage)
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
    # llm-pool's clients read the metrics from their own event, before the response completes.
    yield event("response.metrics", metrics=final["metrics"])
    yield event("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)


@router.post(
    "/v1/responses",
    responses={200: {"model": ResponseObject, "content": RESPONSE_EVENTS}, **GENERATION_ERRORS},
    response_description="The response object, or with `stream: true` its events as server-sent events.",
)
async def create_response(request: ResponsesRequest, http_request: Request) -> Any:
    services = services_of(http_request)
    generation = await admission.prepare(services, http_request, as_chat_request(request), "chat", "/v1/responses",
                                        use_cache=request.use_cache, allow_remote=request.allow_remote)  # fmt: skip
    headers = generation.response_headers()
    if request.stream:
        plan = await relay.stream(generation)
        return StreamingResponse(response_events(plan, generation, request), media_type="text/event-stream",
                                 headers={**headers, **SSE_HEADERS})  # fmt: skip
    result, lookup = await relay.complete(generation)
    choice = result["choices"][0]
    body = response_object(
        f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", generation, request,
        choice["message"].get("content") or "", choice.get("finish_reason"), result.get("usage"),
        lookup in ("hit", "coalesced"),
    )  # fmt: skip
    return OrjsonResponse(body, headers=headers)
