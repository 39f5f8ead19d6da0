"""Streams in OpenAI's chunk shape: assemble one for the cache, replay a cached answer, frame SSE."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

PING = b": ping\n\n"


def sse(payload: bytes, event: str | None = None) -> bytes:
    if event is not None:
        return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"
    return b"data: " + payload + b"\n\n"


class Assembler:
    """Rebuilds the non-streamed response from the chunks of a stream, to store it in the cache."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.parts: list[str] = []
        self.first: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if self.first is None:
            self.first = chunk
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if text:
                self.parts.append(text)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def result(self) -> dict[str, Any] | None:
        """The complete response, or None if the stream did not finish properly."""
        if self.first is None or self.finish_reason is None:
            return None
        text = "".join(self.parts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": self.first.get("id"),
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.first.get("created", int(time.time())),
            "model": self.first.get("model"),
            "choices": [choice],
            "usage": self.usage,
        }


def replay_chunks(response: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A cached complete response as the chunks an uncached stream would have produced, usage last."""
    chat = response.get("object") == "chat.completion"
    base = {
        "id": response.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": response.get("created"),
        "model": response.get("model"),
    }
    choice = response["choices"][0]
    if chat:
        delta = {"role": "assistant", "content": choice["message"].get("content") or ""}
        yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason")}]}
    else:
        yield {**base, "choices": [{"index": 0, "text": choice.get("text", ""), "finish_reason": None}]}
        yield {**base, "choices": [{"index": 0, "text": "", "finish_reason": choice.get("finish_reason")}]}
    if response.get("usage"):
        yield {**base, "choices": [], "usage": response["usage"]}
