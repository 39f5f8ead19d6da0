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

import orjson

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
from modelfleet.server.errors import UNSUPPORTED_PARAMETER, RouterError
from modelfleet.server.model_spec import ModelSpec
from modelfleet.server.upstream import UpstreamClient, UpstreamResponse

# OpenAI request field -> Ollama option.
OPTION_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "num_predict",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    # Not OpenAI's, but vLLM's and llm-pool's names for what Ollama calls top_k and repeat_penalty.
    "top_k": "top_k",
    "repetition_penalty": "repeat_penalty",
}


# Fields of an OpenAI request that the native API has no use for, and that change nothing in the
# answer: accepted and not sent.
NATIVE_IGNORED = frozenset({"user", "metadata", "store", "service_tier"})
# Ollama's own request fields, accepted as vendor extensions (`options` is merged with the mapped ones).
NATIVE_EXTENSIONS = frozenset({"options", "think", "keep_alive", "format"})
MAPPED = frozenset({"model", "messages", "prompt", "tools", "tool_choice", "parallel_tool_calls",
                    "response_format", "logprobs", "top_logprobs", "stop", *OPTION_NAMES})  # fmt: skip


def unsupported(field: str, why: str) -> RouterError:
    return UNSUPPORTED_PARAMETER(f"`{field}` is not supported by this model's backend (Ollama's native API): {why}",
                                 param=field)  # fmt: skip


def text_of(content: Any) -> str:
    """OpenAI message content (a string or a list of parts) as plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def images_of(content: Any) -> list[str]:
    """The base64 images of OpenAI content parts (data: URLs); Ollama fetches no URL itself."""
    images = []
    for part in content if isinstance(content, list) else []:
        if not isinstance(part, dict) or part.get("type") != "image_url":
            continue
        url = (part.get("image_url") or {}).get("url", "") if isinstance(part.get("image_url"), dict) else ""
        header, _, data = url.partition(",")
        if not (header.startswith("data:") and header.endswith(";base64") and data):
            raise unsupported("messages", "images must be data: URLs with base64 content")
        images.append(data)
    return images


def native_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool calls (arguments as a JSON string) as Ollama's (arguments as an object)."""
    native = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        try:
            parsed = orjson.loads(arguments) if isinstance(arguments, str) else arguments
        except orjson.JSONDecodeError:
            raise unsupported("messages", "a tool call's arguments must be a JSON object") from None
        native.append({"id": call.get("id"), "function": {"name": function.get("name"), "arguments": parsed}})
    return native


def native_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names_by_call: dict[str, str] = {}
    native = []
    for message in messages:
        item: dict[str, Any] = {"role": message["role"], "content": text_of(message.get("content"))}
        images = images_of(message.get("content"))
        if images:
            item["images"] = images
        if message.get("tool_calls"):
            item["tool_calls"] = native_tool_calls(message["tool_calls"])
            names_by_call.update({c["id"]: c["function"]["name"] for c in item["tool_calls"] if c.get("id")})
        if message["role"] == "tool":
            call_id = message.get("tool_call_id")
            item["tool_call_id"] = call_id
            item["tool_name"] = message.get("name") or names_by_call.get(call_id or "", "")
        native.append(item)
    return native


def native_format(body: dict[str, Any]) -> Any:
    """response_format as Ollama's format: "json", a JSON Schema, or nothing for text."""
    response_format = body.get("response_format")
    if response_format is None:
        return body.get("format")
    if response_format["type"] == "json_object":
        return "json"
    if response_format["type"] == "json_schema":
        return response_format["json_schema"]["schema"]
    return None


def native_request(kind: Kind, body: dict[str, Any], stream: bool) -> tuple[str, dict[str, Any]]:
    """The OpenAI request as Ollama's native one; what it cannot express is refused, never dropped."""
    unknown = sorted(body.keys() - MAPPED - NATIVE_IGNORED - NATIVE_EXTENSIONS)
    if unknown:  # named in order, so the same request always gets the same error
        raise unsupported(unknown[0], "send it to a model served through an OpenAI-compatible API instead")
    if body.get("logit_bias"):
        raise unsupported("logit_bias", "Ollama has no logit bias")
    if body.get("parallel_tool_calls") is False:
        raise unsupported("parallel_tool_calls", "Ollama cannot be kept to one tool call")
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "auto", "none"):
        raise unsupported("tool_choice", "Ollama lets the model choose (auto), or gets no tools (none)")
    # Options named in Ollama's terms first; the OpenAI fields, and the router's max_tokens, win.
    options = dict(body.get("options") or {})
    options.update({ollama: body[openai] for openai, ollama in OPTION_NAMES.items() if body.get(openai) is not None})
    stop = body.get("stop")
    if stop:
        options["stop"] = [stop] if isinstance(stop, str) else list(stop)
    request: dict[str, Any] = {"model": body["model"], "stream": stream, "options": options}
    for field in ("think", "keep_alive"):
        if field in body:
            request[field] = body[field]
    response_format = native_format(body)
    if response_format is not None:
        request["format"] = response_format
    if body.get("logprobs"):
        request["logprobs"] = True
        if body.get("top_logprobs"):
            request["top_logprobs"] = body["top_logprobs"]
    if kind == "chat":
        request["messages"] = native_messages(body["messages"])
        if body.get("tools") and tool_choice != "none":
            request["tools"] = body["tools"]
        return "/api/chat", request
    if body.get("tools"):
        raise unsupported("tools", "a text completion has no tools")
    prompt = body["prompt"]
    request["prompt"] = prompt[0] if isinstance(prompt, list) else prompt
    # A completion continues the text as given, so the model's chat template is not applied.
    request["raw"] = True
    return "/api/generate", request


def openai_tool_calls(calls: list[dict[str, Any]], streamed: bool = False) -> list[dict[str, Any]]:
    """Ollama's tool calls in OpenAI's shape: ids, and arguments as a JSON string."""
    shaped = []
    for index, call in enumerate(calls):
        function = call.get("function") or {}
        arguments = function.get("arguments")
        encoded = arguments if isinstance(arguments, str) else orjson.dumps(arguments or {}).decode()
        shaped.append({
            **({"index": function.get("index", index)} if streamed else {}),
            "id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": function.get("name", ""), "arguments": encoded},
        })  # fmt: skip
    return shaped


def openai_logprobs(answer: dict[str, Any]) -> dict[str, Any] | None:
    """Ollama's logprobs (token, logprob, bytes, top_logprobs) are OpenAI's entries already."""
    entries = answer.get("logprobs")
    return {"content": entries} if entries else None


def usage_of(answer: dict[str, Any]) -> dict[str, int]:
    prompt = int(answer.get("prompt_eval_count") or 0)
    completion = int(answer.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(answer: dict[str, Any]) -> str:
    return "length" if answer.get("done_reason") == "length" else "stop"


class OllamaBackend:
    def __init__(self, http: UpstreamClient) -> None:
        self.http = http

    async def count_tokens(self, endpoint: str, model: ModelSpec, body: dict[str, Any]) -> dict[str, Any]:
        return await messages.count_tokens(self.http, endpoint, model, body)

    async def complete(self, endpoint: str, model: ModelSpec, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        if kind == "messages":  # Ollama serves Anthropic's API itself (since 0.14)
            return await messages.complete(self.http, endpoint, model, body)
        path, request = native_request(kind, body, stream=False)
        answer = await post_json(self.http, model, f"{endpoint}{path}", request)
        base = {"created": int(time.time()), "model": body["model"], "usage": usage_of(answer)}
        logprobs = openai_logprobs(answer)
        if kind == "chat":
            native = answer.get("message") or {}
            message: dict[str, Any] = {"role": "assistant", "content": native.get("content", "")}
            reason = finish_reason(answer)
            if native.get("tool_calls"):
                message["tool_calls"] = openai_tool_calls(native["tool_calls"])
                reason = "tool_calls"
            choice = {"index": 0, "message": message, "finish_reason": reason, "logprobs": logprobs}
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", **base, "choices": [choice]}
        choice = {"index": 0, "text": answer.get("response", ""), "finish_reason": finish_reason(answer),
                  "logprobs": logprobs}  # fmt: skip
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", **base, "choices": [choice]}

    async def open_stream(
        self, endpoint: str, model: ModelSpec, kind: Kind, body: dict[str, Any]
    ) -> AsyncIterator[Chunk]:
        if kind == "messages":
            return await messages.open_stream(self.http, endpoint, model, body)
        path, request = native_request(kind, body, stream=True)
        response = await send_streaming(self.http, model, f"{endpoint}{path}", request, "application/x-ndjson")
        return self._chunks(response, kind, body["model"])

    @staticmethod
    async def _chunks(response: UpstreamResponse, kind: Kind, model_name: str) -> AsyncIterator[Chunk]:
        chat = kind == "chat"
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }
        first = True
        called_tools = False
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
                    message = part.get("message") or {}
                    delta: dict[str, Any] = {"content": message.get("content", "")}
                    if first:
                        delta["role"] = "assistant"
                    if message.get("tool_calls"):
                        delta["tool_calls"] = openai_tool_calls(message["tool_calls"], streamed=True)
                        called_tools = True
                    if done and called_tools:
                        reason = "tool_calls"
                    choice: dict[str, Any] = {"index": 0, "delta": {} if done else delta, "finish_reason": reason}
                else:
                    choice = {"index": 0, "text": "" if done else part.get("response", ""), "finish_reason": reason}
                logprobs = openai_logprobs(part)
                if logprobs is not None:
                    choice["logprobs"] = logprobs
                first = False
                yield {**base, "choices": [choice]}
                if done:
                    yield {**base, "choices": [], "usage": usage_of(part)}
                    return
            raise StreamBroken("the backend closed the stream before done")
