"""What every backend offers: one complete answer, or a stream of chunks, both in OpenAI's shapes.

The rest of the router speaks only OpenAI's chat/text completion shapes; a backend translates
to and from its server's API, so caching, metrics and the other front-end APIs work the same for
every engine.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal, Protocol

import orjson

from modelfleet.server.errors import (
    UPSTREAM_ERROR,
    UPSTREAM_REJECTED,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    BackendUnreachable,
    PlainRefusal,
    RouterError,
)
from modelfleet.server.model_spec import ModelSpec
from modelfleet.server.upstream import (
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)

Kind = Literal["chat", "completion", "messages"]  # messages: Anthropic's, passed through (backends/messages.py)
Chunk = dict[str, Any]


class StreamBroken(Exception):
    """The backend failed after the stream had started (connection lost, silent too long, error event)."""

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class Backend(Protocol):
    async def complete(self, endpoint: str, model: ModelSpec, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        """The whole answer as an OpenAI chat.completion or text_completion, with usage."""
        ...

    async def open_stream(
        self, endpoint: str, model: ModelSpec, kind: Kind, body: dict[str, Any]
    ) -> AsyncIterator[Chunk]:
        """Send the request and wait for the backend's headers, so that a refusal raises RouterError here,
        before the client got a status.  The iterator yields OpenAI chunks, ends with a usage chunk
        (choices []), raises StreamBroken on a failure mid-stream, and closing it stops the generation.
        Kind "messages" is Anthropic's Messages API: its events, passed through (backends/messages.py)."""
        ...

    async def count_tokens(self, endpoint: str, model: ModelSpec, body: dict[str, Any]) -> dict[str, Any]:
        """Anthropic's `{"input_tokens": N}` for a Messages request, as the backend counts them."""
        ...


def upstream_error(model: ModelSpec, status: int, reason: str, body: bytes) -> RouterError:
    """A backend's refusal in our error shape: its 4xx keep their status, its 5xx become 502."""
    kind: type[RouterError] = RouterError
    try:
        error = orjson.loads(body)["error"]
        message = error["message"] if isinstance(error, dict) else str(error)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message, kind = body.decode(errors="replace")[:500] or reason, PlainRefusal
    if status >= 500:
        return UPSTREAM_ERROR(f"The backend for `{model.name}` failed: {message}")
    return UPSTREAM_REJECTED(message, status=status, kind=kind)


def unreachable(model: ModelSpec, exc: UpstreamError) -> RouterError:
    if isinstance(exc, UpstreamTimeout):
        return UPSTREAM_TIMEOUT(f"The backend for `{model.name}` did not answer in time.")
    if isinstance(exc, UpstreamUnreachable):
        # No connection, so nothing was sent: safe to try another replica (a pod that just stopped).
        return UPSTREAM_UNAVAILABLE(f"The backend for `{model.name}` is unreachable.", kind=BackendUnreachable)
    return UPSTREAM_UNAVAILABLE(f"The backend for `{model.name}` is unreachable.")


def request_headers(model: ModelSpec, accept: str) -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": accept}
    if model.upstream_api_key:
        headers["authorization"] = f"Bearer {model.upstream_api_key}"
    return headers


async def send_streaming(
    http: UpstreamClient, model: ModelSpec, url: str, body: dict[str, Any], accept: str
) -> UpstreamResponse:
    """The backend's response once its headers arrived; the caller reads the body and closes it."""
    try:
        response = await http.request("POST", url, request_headers(model, accept), orjson.dumps(body))
    except UpstreamError as exc:
        raise unreachable(model, exc) from exc
    if response.status >= 400:
        try:
            content = await response.read()
        except UpstreamError:
            content = b""
        finally:
            response.close()
        raise upstream_error(model, response.status, response.reason, content)
    return response


async def post_json(http: UpstreamClient, model: ModelSpec, url: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        status, reason, content = await http.fetch("POST", url, request_headers(model, "application/json"),
                                                   orjson.dumps(body))  # fmt: skip
    except UpstreamError as exc:
        raise unreachable(model, exc) from exc
    if status >= 400:
        raise upstream_error(model, status, reason, content)
    try:
        result = orjson.loads(content)
    except orjson.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        # A 200 that is not a JSON object (plain text from a proxy, a list): the backend failed, not us.
        raise UPSTREAM_ERROR(f"The backend for `{model.name}` answered with something that is not a JSON object: "
                             f"{content[:120].decode(errors='replace')!r}")  # fmt: skip
    return result


# The longest line read from a backend: the last line of Ollama's /api/generate carries the whole
# `context` array, which can be long, but a backend that never sends a newline must not grow the
# router's memory without bound.
MAX_LINE_BYTES = 16 * 1024 * 1024


async def upstream_lines(response: UpstreamResponse) -> AsyncGenerator[bytes]:
    """The body's lines (each with its newline; the last may lack one) as they arrive; a broken
    connection, or a line over MAX_LINE_BYTES, becomes StreamBroken: never a silent end.

    Closing this iterator closes the connection, which is what tells the backend to stop generating.
    """
    pending = bytearray()
    try:
        async for data in response:
            pending += data
            start = 0
            while (end := pending.find(b"\n", start)) != -1:
                yield bytes(pending[start : end + 1])
                start = end + 1
            del pending[:start]
            if len(pending) > MAX_LINE_BYTES:
                raise StreamBroken(f"the backend sent a line longer than {MAX_LINE_BYTES} bytes")
        if pending:
            yield bytes(pending)
    except UpstreamError as exc:
        raise StreamBroken(str(exc), timed_out=isinstance(exc, UpstreamTimeout)) from exc
    finally:
        response.close()


def decode(payload: bytes) -> dict[str, Any]:
    try:
        parsed: dict[str, Any] = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise StreamBroken("the backend sent data that is not JSON") from exc
    return parsed
