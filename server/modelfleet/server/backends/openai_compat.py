"""OpenAI-compatible backends: vLLM, llama.cpp, Ollama's /v1, remote providers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from modelfleet.server.errors import RouterError
from modelfleet.server.registry import ModelRoute


def upstream_error(route: ModelRoute, response: httpx.Response, body: bytes) -> RouterError:
    try:
        message = orjson.loads(body)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = body.decode(errors="replace")[:500] or response.reason_phrase
    if response.status_code >= 500:
        return RouterError(502, f"The backend for `{route.name}` failed: {message}", type="upstream_error",
                           code="upstream_error")  # fmt: skip
    return RouterError(response.status_code, message, code="upstream_rejected")


def unreachable(route: ModelRoute, exc: httpx.HTTPError) -> RouterError:
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return RouterError(504, f"The backend for `{route.name}` did not answer in time.", type="upstream_error",
                           code="upstream_timeout")  # fmt: skip
    return RouterError(502, f"The backend for `{route.name}` is unreachable.", type="upstream_error",
                       code="upstream_unavailable")  # fmt: skip


class OpenAICompatBackend:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def complete(self, route: ModelRoute, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self.client.post(f"{route.base_url}{path}", content=orjson.dumps(body),
                                              headers={"content-type": "application/json"})  # fmt: skip
        except httpx.HTTPError as exc:
            raise unreachable(route, exc) from exc
        if response.status_code >= 400:
            raise upstream_error(route, response, response.content)
        result: dict[str, Any] = orjson.loads(response.content)
        return result

    async def open_stream(self, route: ModelRoute, path: str, body: dict[str, Any]) -> httpx.Response:
        """Send the request and wait for the backend's headers, so errors come before ours are sent."""
        request = self.client.build_request(
            "POST", f"{route.base_url}{path}", content=orjson.dumps(body),
            headers={"content-type": "application/json", "accept": "text/event-stream"},
        )  # fmt: skip
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise unreachable(route, exc) from exc
        if response.status_code >= 400:
            content = await response.aread()
            await response.aclose()
            raise upstream_error(route, response, content)
        return response

    @staticmethod
    async def events(response: httpx.Response) -> AsyncIterator[bytes]:
        """The `data:` payloads of an upstream SSE stream, as they arrive; closes the stream at the end."""
        try:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    yield line[5:].strip().encode()
        finally:
            # Closing the connection is what tells the backend to stop generating.
            await response.aclose()
