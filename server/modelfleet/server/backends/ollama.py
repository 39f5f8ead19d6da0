"""Ollama's native API: /api/chat and /api/generate with NDJSON streaming, mapped to OpenAI shapes.

Native rather than Ollama's /v1 because it reports prompt_eval_count and eval_count on every
answer (usage), and accepts options such as num_predict and seed directly.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from modelfleet.server.backends.base import (
    Chunk,
    Kind,
    StreamBroken,
    decode,
    post_json,
    send_streaming,
    upstream_lines,
)
from modelfleet.server.registry import ModelSpec

# OpenAI request field -> Ollama option.
OPTION_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "num_predict",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def text_of(content: Any) -> str:
    """OpenAI message content (a string or a list of parts) as plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def native_request(kind: Kind, body: dict[str, Any], stream: bool) -> tuple[str, dict[str, Any]]:
    options = {ollama: body[openai] for openai, ollama in OPTION_NAMES.items() if body.get(openai) is not None}
    stop = body.get("stop")
    if stop:
        options["stop"] = [stop] if isinstance(stop, str) else list(stop)
    request: dict[str, Any] = {"model": body["model"], "stream": stream, "options": options}
    if kind == "chat":
        request["messages"] = [{"role": m["role"], "content": text_of(m.get("content"))} for m in body["messages"]]
        return "/api/chat", request
    prompt = body["prompt"]
    request["prompt"] = prompt[0] if isinstance(prompt, list) else prompt
    # A completion continues the text as given, so the model's chat template is not applied.
    request["raw"] = True
    return "/api/generate", request


def usage_of(answer: dict[str, Any]) -> dict[str, int]:
    prompt = int(answer.get("prompt_eval_count") or 0)
    completion = int(answer.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(answer: dict[str, Any]) -> str:
    return "length" if answer.get("done_reason") == "length" else "stop"


class OllamaBackend:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def complete(self, endpoint: str, model: ModelSpec, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        path, request = native_request(kind, body, stream=False)
        answer = await post_json(self.session, model, f"{endpoint}{path}", request)
        base = {"created": int(time.time()), "model": body["model"], "usage": usage_of(answer)}
        if kind == "chat":
            message = {"role": "assistant", "content": (answer.get("message") or {}).get("content", "")}
            choice = {"index": 0, "message": message, "finish_reason": finish_reason(answer)}
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", **base, "choices": [choice]}
        choice = {"index": 0, "text": answer.get("response", ""), "finish_reason": finish_reason(answer)}
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", **base, "choices": [choice]}

    async def open_stream(
        self, endpoint: str, model: ModelSpec, kind: Kind, body: dict[str, Any]
    ) -> AsyncIterator[Chunk]:
        path, request = native_request(kind, body, stream=True)
        response = await send_streaming(self.session, model, f"{endpoint}{path}", request, "application/x-ndjson")
        return self._chunks(response, kind, body["model"])

    @staticmethod
    async def _chunks(response: aiohttp.ClientResponse, kind: Kind, model_name: str) -> AsyncIterator[Chunk]:
        chat = kind == "chat"
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }
        first = True
        async with contextlib.aclosing(upstream_lines(response)) as lines:
            async for line in lines:
                if not line.strip():
                    continue
                part = decode(line)
                if "error" in part:
                    raise StreamBroken(str(part["error"]))
                done = bool(part.get("done"))
                reason = finish_reason(part) if done else None
                if chat:
                    delta: dict[str, Any] = {"content": (part.get("message") or {}).get("content", "")}
                    if first:
                        delta["role"] = "assistant"
                    choice: dict[str, Any] = {"index": 0, "delta": {} if done else delta, "finish_reason": reason}
                else:
                    choice = {"index": 0, "text": "" if done else part.get("response", ""), "finish_reason": reason}
                first = False
                yield {**base, "choices": [choice]}
                if done:
                    yield {**base, "choices": [], "usage": usage_of(part)}
                    return
            raise StreamBroken("the backend closed the stream before done")
