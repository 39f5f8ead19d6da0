"""The Anthropic Messages API through the router, with the official `anthropic` SDK, in front of the real Ollama
(which serves /v1/messages itself): answers, streams, tools, stop sequences, count_tokens' documented refusal,
both ways of sending a key, errors in Anthropic's shape, and the key's token budget charged by each call."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import OllamaServer, RouterServer, hashed_key, running_router, write_keys_file
from tests.support.recording_backend import recording_backend

pytestmark = pytest.mark.integration

KEY = "sk-anthropic-test"
SERVED = "coder-model"
BUDGET = 100_000
SYSTEM = "You are a terse assistant."
ASK = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def router(ollama_server: OllamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterServer]:
    work_dir = tmp_path_factory.mktemp("anthropic-router")
    keys = write_keys_file(work_dir, hashed_key("coder", KEY, tokens_per_minute=BUDGET))
    # A name of the router's own, so that answers show which name they carry (Ollama's is the upstream one).
    models: list[dict[str, object]] = [{"name": SERVED, "url": ollama_server.base_url, "aliases": ["gemma"],
                                        "upstream_model": ollama_server.model}]  # fmt: skip
    with running_router(work_dir, models, api_keys_file=str(keys), auth_required="true") as server:
        yield server


@pytest.fixture
def client(router: RouterServer) -> anthropic.Anthropic:
    # This SDK sends `api_key` as a bearer token; x-api-key (what Claude Code and older SDKs send) is set by hand.
    return anthropic.Anthropic(base_url=router.base_url, api_key=None, default_headers={"x-api-key": KEY},
                               max_retries=0, timeout=120)  # fmt: skip


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_create_with_a_system_prompt_sent_with_x_api_key(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="gemma", max_tokens=12, system=SYSTEM, messages=ASK)  # type: ignore[arg-type]
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == SERVED  # the model the alias resolves to, as chat answers name it
    assert text_of(message)
    assert message.usage.input_tokens > 0
    assert 0 < message.usage.output_tokens <= 12
    assert message.stop_reason in ("end_turn", "max_tokens")


def test_create_sends_x_api_key(client: anthropic.Anthropic) -> None:
    response = client.messages.with_raw_response.create(model="gemma", max_tokens=4, messages=ASK)  # type: ignore[arg-type]
    assert response.http_request.headers["x-api-key"] == KEY
    assert "authorization" not in response.http_request.headers
    assert response.parse().usage.output_tokens > 0


def test_a_bearer_token_is_accepted_too(router: RouterServer) -> None:
    bearer = anthropic.Anthropic(base_url=router.base_url, api_key=KEY, max_retries=0, timeout=120)
    response = bearer.messages.with_raw_response.create(model="gemma", max_tokens=4, messages=ASK)  # type: ignore[arg-type]
    assert "x-api-key" not in response.http_request.headers
    assert response.http_request.headers["authorization"] == f"Bearer {KEY}"
    assert response.parse().usage.output_tokens > 0


def test_stream_with_the_sdk_helpers(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="gemma", max_tokens=16, system=SYSTEM, messages=ASK) as stream:  # type: ignore[arg-type]
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1, "the text arrives in pieces, as it is generated"
    assert "".join(pieces) == text_of(final)
    assert final.model == SERVED
    assert 0 < final.usage.output_tokens <= 16
    assert final.stop_reason in ("end_turn", "max_tokens")


def test_raw_stream_has_anthropics_event_types(router: RouterServer) -> None:
    body = {"model": "gemma", "max_tokens": 6, "stream": True, "messages": ASK}
    with httpx.stream("POST", f"{router.base_url}/v1/messages", json=body, headers={"x-api-key": KEY},
                      timeout=120) as response:  # fmt: skip
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        names = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event: ")]
    assert names[0] == "message_start"
    assert names[-2:] == ["message_delta", "message_stop"]
    assert {"content_block_start", "content_block_delta", "content_block_stop"} <= set(names)


CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"name": "get_weather", "description": "The weather in a city.", "input_schema": CITY}]
TOOL_TURNS = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
    },
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C."}]},
]


def test_tools_reach_ollama_and_a_tool_result_turn_is_answered(client: anthropic.Anthropic) -> None:
    # Gemma 3 270M's template has no tools: Ollama's own refusal comes back, so the tools reached it.
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="gemma", max_tokens=8, tools=TOOLS, messages=TOOL_TURNS)  # type: ignore[arg-type]
    assert "does not support tools" in str(refused.value)
    # The conversation with the tool's call and result is answered, and the result is in the prompt.
    message = client.messages.create(model="gemma", max_tokens=8, messages=TOOL_TURNS)  # type: ignore[arg-type]
    first_turn = client.messages.create(model="gemma", max_tokens=1, messages=TOOL_TURNS[:1])  # type: ignore[arg-type]
    assert message.content
    assert message.usage.input_tokens > first_turn.usage.input_tokens


def test_a_tool_call_and_its_result_cross_the_router_unchanged(tmp_path: Path) -> None:
    # A backend that makes the call (no engine here does on demand); the router is what is under test.
    def script(body: dict[str, Any]) -> dict[str, Any]:
        last = body["messages"][-1]["content"]
        if isinstance(last, list) and last[0]["type"] == "tool_result":
            content: list[dict[str, Any]] = [{"type": "text", "text": "It is sunny in Paris."}]
            stop = "end_turn"
        else:
            content, stop = (
                [{"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Paris"}}],
                "tool_use",
            )
        usage = {"input_tokens": 30, "output_tokens": 5}
        return {"id": "msg_1", "type": "message", "role": "assistant", "model": "scripted", "content": content,
                "stop_reason": stop, "stop_sequence": None, "usage": usage}  # fmt: skip

    with recording_backend(script) as backend:
        models: list[dict[str, object]] = [{"name": "m", "url": backend.base_url, "upstream_model": "scripted"}]
        with running_router(tmp_path, models) as server:
            sdk = anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
            call = sdk.messages.create(
                model="m",
                max_tokens=32,
                tools=TOOLS,
                tool_choice={"type": "auto"},  # type: ignore[arg-type]
                messages=TOOL_TURNS[:1],
            )  # type: ignore[arg-type]
            assert call.stop_reason == "tool_use"
            use = call.content[0]
            assert use.type == "tool_use"
            assert use.name == "get_weather"
            assert use.input == {"city": "Paris"}
            answer = sdk.messages.create(model="m", max_tokens=32, tools=TOOLS, messages=TOOL_TURNS)  # type: ignore[arg-type]
    assert text_of(answer) == "It is sunny in Paris."
    first, second = backend.bodies
    assert first["tools"] == TOOLS
    assert first["tool_choice"] == {"type": "auto"}
    assert first["model"] == "scripted"
    assert second["messages"] == TOOL_TURNS


def test_stop_sequences_end_the_answer(client: anthropic.Anthropic) -> None:
    ask = {"model": "gemma", "max_tokens": 24, "extra_body": {"temperature": 0}, "system": SYSTEM, "messages": ASK}
    full = text_of(client.messages.create(**ask))  # type: ignore[arg-type]
    words = full.split()
    assert len(words) >= 3, full
    stop = next(word for word in words if full.index(word) > 0)  # so that some text comes before it
    stopped = client.messages.create(**ask, stop_sequences=[stop])  # type: ignore[arg-type]
    text = text_of(stopped)
    assert stop not in text
    assert len(text) < len(full)
    assert full.startswith(text), (full, stop, text)
    assert stopped.stop_reason in ("stop_sequence", "end_turn")


def test_count_tokens_is_refused_clearly_because_ollama_cannot_count(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as refused:
        client.messages.count_tokens(model="gemma", system=SYSTEM, messages=ASK)  # type: ignore[arg-type]
    body = refused.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
    assert "does not count tokens" in body["error"]["message"]
    assert "count_tokens_unsupported" in body["error"]["message"]


@pytest.mark.parametrize("key", [None, "sk-not-a-key"])
def test_a_missing_or_wrong_key_is_anthropics_authentication_error(router: RouterServer, key: str | None) -> None:
    headers = {} if key is None else {"x-api-key": key}
    response = httpx.post(f"{router.base_url}/v1/messages", headers=headers, timeout=30,
                          json={"model": "gemma", "max_tokens": 4, "messages": ASK})  # fmt: skip
    assert response.status_code == 401
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert set(body) == {"type", "error"}
    assert set(body["error"]) == {"type", "message"}
    # The SDK cannot send no key at all; a wrong one is its AuthenticationError.
    sdk = anthropic.Anthropic(base_url=router.base_url, api_key=key or "sk-also-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        sdk.messages.create(model="gemma", max_tokens=4, messages=ASK)  # type: ignore[arg-type]


def test_a_bad_body_is_anthropics_invalid_request_error(client: anthropic.Anthropic, router: RouterServer) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="gemma", max_tokens=0, messages=ASK)  # type: ignore[arg-type]
    assert refused.value.status_code == 400
    body = refused.value.body
    assert isinstance(body, dict)
    assert body == {"type": "error", "error": {"type": "invalid_request_error", "message": body["error"]["message"]}}
    assert "max_tokens" in body["error"]["message"]
    # Not JSON at all: still Anthropic's shape.
    response = httpx.post(f"{router.base_url}/v1/messages", content=b"{", timeout=30,
                          headers={"x-api-key": KEY, "content-type": "application/json"})  # fmt: skip
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    # Every other path keeps the router's OpenAI-style errors.
    chat = httpx.post(f"{router.base_url}/v1/chat/completions", content=b"{", timeout=30,
                      headers={"x-api-key": KEY, "content-type": "application/json"})  # fmt: skip
    assert chat.status_code == 400
    assert chat.json()["error"]["code"] == "invalid_request"


def remaining_tokens(response: anthropic.APIResponse[anthropic.types.Message]) -> int:
    return int(response.headers["x-ratelimit-remaining-tokens"])


def test_messages_calls_are_charged_to_the_keys_token_budget(client: anthropic.Anthropic) -> None:
    # The same prompt and max_tokens each time, so each reserves the same at admission; sampled (no
    # temperature), so none is a cache hit. What the header says at one admission, less the next one's,
    # is what the call in between was charged.
    ask = {"model": "gemma", "max_tokens": 8, "system": SYSTEM, "messages": ASK}
    first = client.messages.with_raw_response.create(**ask)  # type: ignore[arg-type]
    usage = first.parse().usage
    second = client.messages.with_raw_response.create(**ask)  # type: ignore[arg-type]
    assert remaining_tokens(first) < BUDGET, "the reservation counts at admission"
    assert remaining_tokens(first) - remaining_tokens(second) == usage.input_tokens + usage.output_tokens
    # A stream is charged its usage from message_delta.
    streamed_usage = second.parse().usage
    with client.messages.stream(**ask) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
    third = client.messages.with_raw_response.create(**ask)  # type: ignore[arg-type]
    charged = remaining_tokens(second) - remaining_tokens(third)
    assert (
        charged
        == streamed_usage.input_tokens
        + streamed_usage.output_tokens
        + final.usage.input_tokens
        + final.usage.output_tokens
    )


def test_metrics_are_labelled_with_the_messages_path(router: RouterServer, client: anthropic.Anthropic) -> None:
    client.messages.create(model="gemma", max_tokens=2, messages=ASK)  # type: ignore[arg-type]
    metrics = httpx.get(f"{router.base_url}/metrics", timeout=10).text
    assert any(line.startswith("modelfleet_requests_total{") and 'route="/v1/messages"' in line
               and 'status_class="2xx"' in line for line in metrics.splitlines())  # fmt: skip


def test_models_without_the_messages_api_are_refused_clearly(tmp_path: Path, ollama_server: OllamaServer) -> None:
    # A backend that answers /v1/messages with a plain 404, as an OpenAI-compatible server without
    # Anthropic's API does: Ollama's /api/tags root stands in for it (same server, a path prefix that
    # makes every /v1/messages call a 404 of its web server).
    models: list[dict[str, object]] = [{"name": "plain", "url": f"{ollama_server.base_url}/nowhere",
                                        "upstream_model": ollama_server.model}]  # fmt: skip
    with running_router(tmp_path, models) as server:
        sdk = anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(anthropic.BadRequestError) as refused:
            sdk.messages.create(model="plain", max_tokens=4, messages=ASK)  # type: ignore[arg-type]
    assert "does not serve the Anthropic Messages API" in str(refused.value)
