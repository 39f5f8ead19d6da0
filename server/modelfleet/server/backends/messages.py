"""The Anthropic Messages API, passed through to backends that serve it natively.

Ollama (since 0.14) and vLLM serve `POST /v1/messages` themselves, with Anthropic's request and answer
shapes and its server-sent events; the router sends the request as it came (its model name and
max_tokens set by admission) and relays the answer unchanged. No translation to chat completions: a
backend that answers the path with a plain 404 (it does not know it) is refused with
`messages_unsupported`, and one that cannot count tokens with `count_tokens_unsupported`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson

from modelfleet.server.backends.base import (
    Chunk,
    StreamBroken,
    decode,
    post_json,
    send_streaming,
    upstream_lines,
)
from modelfleet.server.errors import COUNT_TOKENS_UNSUPPORTED, MESSAGES_UNSUPPORTED, PlainRefusal, RouterError
from modelfleet.server.model_spec import ModelSpec
from modelfleet.server.upstream import UpstreamClient, UpstreamResponse

MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"


def unserved(exc: RouterError, model: ModelSpec, path: str) -> RouterError:
    """A plain 404 or 405 of the path (no JSON error, as a missing model gets) means the backend lacks it."""
    if not isinstance(exc, PlainRefusal) or exc.status not in (404, 405):
        return exc
    if path == COUNT_TOKENS_PATH:
        return COUNT_TOKENS_UNSUPPORTED(f"The backend of `{model.name}` does not count tokens ({path} is not "
                                        "served there); the router does not estimate one.")  # fmt: skip
    return MESSAGES_UNSUPPORTED(f"The backend of `{model.name}` does not serve the Anthropic Messages API ({path}); "
                                "use /v1/chat/completions for this model.")  # fmt: skip


async def complete(http: UpstreamClient, endpoint: str, model: ModelSpec, body: dict[str, Any]) -> dict[str, Any]:
    """The whole Anthropic message (with `usage.input_tokens` and `output_tokens`)."""
    try:
        return await post_json(http, model, f"{endpoint}{MESSAGES_PATH}", {**body, "stream": False})
    except RouterError as exc:
        raise unserved(exc, model, MESSAGES_PATH) from None


async def count_tokens(http: UpstreamClient, endpoint: str, model: ModelSpec, body: dict[str, Any]) -> dict[str, Any]:
    """`{"input_tokens": N}` as the backend counts them."""
    try:
        return await post_json(http, model, f"{endpoint}{COUNT_TOKENS_PATH}", body)
    except RouterError as exc:
        raise unserved(exc, model, COUNT_TOKENS_PATH) from None


async def open_stream(
    http: UpstreamClient, endpoint: str, model: ModelSpec, body: dict[str, Any]
) -> AsyncIterator[Chunk]:
    try:
        response = await send_streaming(http, model, f"{endpoint}{MESSAGES_PATH}", {**body, "stream": True},
                                        "text/event-stream")  # fmt: skip
    except RouterError as exc:
        raise unserved(exc, model, MESSAGES_PATH) from None
    return events(response)


async def events(response: UpstreamResponse) -> AsyncIterator[Chunk]:
    """Each event's data (its `type` is the event's name), up to message_stop; an error event or an end
    before message_stop is StreamBroken."""
    async with contextlib.aclosing(upstream_lines(response)) as lines:
        async for line in lines:
            if not line.startswith(b"data:"):
                continue  # `event:` lines repeat the data's type; blank lines and comments carry nothing
            event = decode(line[5:].strip())
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise StreamBroken(f"the backend sent an event without a type: {orjson.dumps(event)[:120]!r}")
            if event["type"] == "error":
                error = event.get("error")
                raise StreamBroken(error.get("message", "error event") if isinstance(error, dict) else str(error))
            yield event
            if event["type"] == "message_stop":
                return
        raise StreamBroken("the backend closed the stream before message_stop")
