"""A tool call that succeeds, end to end through the router, with the real `openai` SDK as the client.

The model's side is a recording backend (tests/support/recording_backend.py): the real Gemma 3 270M's
template has no tools, so Ollama refuses them (test_router_passthrough.py proves the router passes that
refusal on). Here the backend makes the call, and the test proves the fields cross the router both ways
unchanged: the tools and tool_choice the client sent, the call the model made, and the tool's result in
the next turn; streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import start_router
from tests.support.recording_backend import RecordingBackend, recording_backend

pytestmark = pytest.mark.integration

WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "weather", "description": "The weather in a city.",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
}  # fmt: skip
ARGUMENTS = '{"city": "Paris"}'
CALL = {"id": "call_weather_1", "type": "function", "function": {"name": "weather", "arguments": ARGUMENTS}}
RESULT = "Sunny, 21 degrees."
FINAL = "It is sunny in Paris, 21 degrees."
CREATED = 1_765_000_000


def chunk(body: dict[str, Any], delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": CREATED, "model": body["model"],
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}  # fmt: skip


def model_turn(body: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
    """Calls the tool, unless the last message is the tool's result: then answers in words."""
    answered = body["messages"][-1]["role"] == "tool"
    if body.get("stream"):
        if answered:
            return [chunk(body, {"role": "assistant", "content": FINAL}), chunk(body, {}, "stop")]
        head = {"index": 0, "id": CALL["id"], "type": "function", "function": {"name": "weather", "arguments": ""}}
        # The arguments arrive in pieces, as an engine streams them.
        pieces = [ARGUMENTS[:9], ARGUMENTS[9:]]
        return [
            chunk(body, {"role": "assistant", "content": None, "tool_calls": [head]}),
            *(chunk(body, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}) for piece in pieces),
            chunk(body, {}, "tool_calls"),
        ]
    message: dict[str, Any] = (
        {"role": "assistant", "content": FINAL}
        if answered
        else {"role": "assistant", "content": None, "tool_calls": [CALL]}
    )
    return {
        "id": "chatcmpl-scripted", "object": "chat.completion", "created": CREATED, "model": body["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": "stop" if answered else "tool_calls"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29},
    }  # fmt: skip


@pytest.fixture(scope="module")
def backend() -> Iterator[RecordingBackend]:
    with recording_backend(model_turn) as running:
        yield running


@pytest.fixture(scope="module")
def sdk(backend: RecordingBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    models: list[dict[str, object]] = [{"name": "tools", "url": backend.base_url, "upstream_model": "scripted"}]
    for router in start_router(tmp_path_factory.mktemp("router"), models):
        yield openai.OpenAI(base_url=f"{router.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(city: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"What is the weather in {city}?"}]


def test_a_tool_call_and_its_result_cross_the_router_unchanged(sdk: openai.OpenAI, backend: RecordingBackend) -> None:
    messages = ask("Paris")
    first = sdk.chat.completions.create(model="tools", messages=messages, tools=[WEATHER_TOOL], tool_choice="required")  # type: ignore[arg-type]
    sent = backend.bodies[-1]
    assert (sent["tools"], sent["tool_choice"], sent["messages"]) == ([WEATHER_TOOL], "required", messages)
    assert sent["model"] == "scripted"
    (choice,) = first.choices
    assert choice.finish_reason == "tool_calls"
    assert [call.model_dump() for call in choice.message.tool_calls or []] == [CALL]

    # The next turn carries the call and its result back to the model, as the client wrote them.
    follow_up = [*messages, choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": CALL["id"], "content": RESULT}]  # fmt: skip
    second = sdk.chat.completions.create(model="tools", messages=follow_up, tools=[WEATHER_TOOL])  # type: ignore[arg-type]
    sent = backend.bodies[-1]
    assert sent["messages"][1]["tool_calls"] == [CALL]
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": CALL["id"], "content": RESULT}
    assert (second.choices[0].message.content, second.choices[0].finish_reason) == (FINAL, "stop")


def test_a_streamed_tool_call_arrives_whole_through_the_router(sdk: openai.OpenAI, backend: RecordingBackend) -> None:
    messages = ask("Paris, streamed")
    stream = sdk.chat.completions.create(
        model="tools",
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        stream=True,  # type: ignore[arg-type]
    )
    calls: dict[int, dict[str, str]] = {}
    finish_reasons = []
    for event in stream:
        for choice in event.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                call["name"] += (delta.function.name or "") if delta.function else ""
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    sent = backend.bodies[-1]
    assert (sent["stream"], sent["tools"], sent["tool_choice"]) == (True, [WEATHER_TOOL], "required")
    assert calls == {0: {"id": CALL["id"], "name": "weather", "arguments": ARGUMENTS}}
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert finish_reasons == ["tool_calls"]
