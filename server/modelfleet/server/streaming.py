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


# What the assembler rebuilds: text, its role and how it ended. A chunk with anything else (tool calls,
# logprobs, a refusal, reasoning, several choices...) makes the answer one it cannot rebuild field by field,
# and a cache must never serve a lossy copy of an answer in place of the real one.
CHUNK_FIELDS = frozenset({"id", "object", "created", "model", "choices", "usage", "system_fingerprint"})
CHAT_CHOICE_FIELDS = frozenset({"index", "delta", "finish_reason", "logprobs"})
TEXT_CHOICE_FIELDS = frozenset({"index", "text", "finish_reason", "logprobs"})
DELTA_FIELDS = frozenset({"role", "content"})


class Assembler:
    """Rebuilds the non-streamed response from the chunks of a stream, to store it in the cache."""

    def __init__(self, chat: bool, rebuild: bool = True) -> None:
        self.chat = chat
        # False for a stream that will not be cached: only its usage is kept (the token charge and
        # the tokens/s metric need it), and no chunk is inspected further.
        self.rebuild = rebuild
        self.parts: list[str] = []
        self.first: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.system_fingerprint: str | None = None
        # False once a chunk carried what result() cannot rebuild.
        self.lossless = True

    def add(self, chunk: dict[str, Any]) -> None:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if not self.rebuild:
            return
        if self.first is None:
            self.first = chunk
        if chunk.get("system_fingerprint"):
            self.system_fingerprint = chunk["system_fingerprint"]
        if self.lossless and not self._rebuildable(chunk):
            self.lossless = False
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if text:
                self.parts.append(text)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def _rebuildable(self, chunk: dict[str, Any]) -> bool:
        if not CHUNK_FIELDS.issuperset(chunk):
            return False
        allowed = CHAT_CHOICE_FIELDS if self.chat else TEXT_CHOICE_FIELDS
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0 or not allowed.issuperset(choice) or choice.get("logprobs") is not None:
                return False
            delta = choice.get("delta") or {}
            if not DELTA_FIELDS.issuperset(k for k, v in delta.items() if v is not None):
                return False
        return True

    def result(self) -> dict[str, Any] | None:
        """The complete response, or None if the stream did not finish properly or carried what cannot be
        rebuilt (then it is not cached)."""
        if not self.rebuild or self.first is None or self.finish_reason is None or not self.lossless:
            return None
        text = "".join(self.parts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        rebuilt = {
            "id": self.first.get("id"),
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.first.get("created", int(time.time())),
            "model": self.first.get("model"),
            "choices": [choice],
            "usage": self.usage,
        }
        if self.system_fingerprint is not None:
            rebuilt["system_fingerprint"] = self.system_fingerprint
        return rebuilt


def replayable(response: dict[str, Any]) -> bool:
    """Whether replay_chunks() gives back all of a cached answer: one choice of text, nothing else (a cached
    tool call or logprobs would be lost in the replay, so such a streamed request goes to the backend)."""
    choices = response.get("choices") or []
    if len(choices) != 1:
        return False
    choice = choices[0]
    if choice.get("logprobs") is not None:
        return False
    if "message" in choice:
        message = choice.get("message") or {}
        return CHAT_CHOICE_FIELDS.union({"message"}).issuperset(choice) and DELTA_FIELDS.issuperset(
            k for k, v in message.items() if v is not None
        )
    return TEXT_CHOICE_FIELDS.issuperset(choice)


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


class MessagesAssembler:
    """The usage of an Anthropic Messages stream, for the token charge and the metrics.

    message_start carries the input tokens (Ollama's there are an estimate, made before the prompt is
    evaluated), message_delta the output tokens and, with Ollama and vLLM, the real input tokens: later
    counts replace earlier ones. A stream is not rebuilt for the cache (streamed messages are not cached).
    """

    def __init__(self) -> None:
        self.usage: dict[str, Any] | None = None

    def add(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start":
            usage = (event.get("message") or {}).get("usage")
        elif kind == "message_delta":
            usage = event.get("usage")
        else:
            return
        if isinstance(usage, dict):
            self.usage = {**(self.usage or {}), **{key: value for key, value in usage.items() if value is not None}}

    def result(self) -> dict[str, Any] | None:
        return None


def messages_text(event: dict[str, Any]) -> bool:
    """Whether an Anthropic stream event carries generated tokens (text, thinking, a tool call's input)."""
    return event.get("type") == "content_block_delta"
