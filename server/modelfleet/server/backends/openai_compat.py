"""OpenAI-compatible backends: vLLM, llama.cpp, Ollama's /v1, remote providers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from modelfleet.server.backends import messages
from modelfleet.server.backends.base import (
    Chunk,
    Kind,
    StreamBroken,
    decode,
    post_json,
    send_streaming,
    upstream_lines,
)
from modelfleet.server.model_spec import ModelSpec
from modelfleet.server.upstream import UpstreamClient, UpstreamResponse

PATHS: dict[Kind, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions",
                          "messages": messages.MESSAGES_PATH}  # fmt: skip


class OpenAICompatBackend:
    def __init__(self, http: UpstreamClient) -> None:
        self.http = http

    async def count_tokens(self, endpoint: str, model: ModelSpec, body: dict[str, Any]) -> dict[str, Any]:
        return await messages.count_tokens(self.http, endpoint, model, body)

    async def complete(self, endpoint: str, model: ModelSpec, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        if kind == "messages":  # vLLM and Ollama's /v1 serve Anthropic's API themselves
            return await messages.complete(self.http, endpoint, model, body)
        return await post_json(self.http, model, f"{endpoint}{PATHS[kind]}", {**body, "stream": False})

    async def open_stream(
        self, endpoint: str, model: ModelSpec, kind: Kind, body: dict[str, Any]
    ) -> AsyncIterator[Chunk]:
        if kind == "messages":
            return await messages.open_stream(self.http, endpoint, model, body)
        # Usage is always asked for: the router needs it for metrics, token limits and the cache.
        upstream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        response = await send_streaming(self.http, model, f"{endpoint}{PATHS[kind]}", upstream_body,
                                         "text/event-stream")  # fmt: skip
        return self._chunks(response)

    @staticmethod
    async def _chunks(response: UpstreamResponse) -> AsyncIterator[Chunk]:
        async with contextlib.aclosing(upstream_lines(response)) as lines:
            async for line in lines:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                chunk = decode(payload)
                if "error" in chunk:
                    error = chunk["error"]
                    raise StreamBroken(error.get("message", "error event") if isinstance(error, dict) else str(error))
                yield chunk
            raise StreamBroken("the backend closed the stream before [DONE]")
