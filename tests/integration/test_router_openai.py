"""The router's OpenAI API, with the official `openai` SDK, in front of the real Ollama and Gemma 3 270M."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RouterServer, start_router

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture
def sdk(router_server: RouterServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=router_server.openai_base_url, api_key="unused", max_retries=0, timeout=120)


def test_sdk_chat_completion(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(model="gemma3:270m", messages=MESSAGES, max_tokens=24, seed=3)
    assert completion.model == "gemma3:270m"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.choices[0].message.content.strip()
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0


def test_sdk_streaming_chat_with_usage(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="gemma",
        messages=MESSAGES,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert {c.model for c in chunks} == {"gemma3:270m"}


def test_sdk_text_completion_and_model_list(sdk: openai.OpenAI) -> None:
    completion = sdk.completions.create(model="gemma3:270m", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    assert completion.choices[0].text.strip()
    assert [model.id for model in sdk.models.list()] == ["gemma3:270m"]


def test_sse_framing_line_by_line(router_server: RouterServer) -> None:
    body = {"model": "gemma3:270m", "messages": MESSAGES, "stream": True, "max_tokens": 12,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{router_server.openai_base_url}/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        raw = b"".join(response.iter_raw()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "", "the stream ends with a complete event"
    events = events[:-1]
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert payloads[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    ("body", "status", "code_or_param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"messages": MESSAGES}).encode(), 400, "model"),
        (json.dumps({"model": "nope", "messages": MESSAGES}).encode(), 404, "model_not_found"),
        (json.dumps({"model": "gemma3:270m", "messages": MESSAGES, "max_tokens": 100000}).encode(), 400,
         "max_tokens_exceeded"),
        (json.dumps({"model": "gemma3:270m", "messages": MESSAGES, "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({"model": "gemma3:270m", "messages": "hello"}).encode(), 400, "messages"),
        (json.dumps({"model": "gemma3:270m", "messages": []}).encode(), 400, "messages"),
        (json.dumps({"model": "gemma3:270m", "messages": MESSAGES, "n": 3}).encode(), 400, "n"),
        (json.dumps({"model": "gemma3:270m", "messages": MESSAGES, "max_tokens": -1}).encode(), 400, "max_tokens"),
    ],
    ids=["invalid-json", "not-an-object", "missing-model", "unknown-model", "max-tokens-over-cap", "wrong-type",
         "messages-not-a-list", "no-messages", "n-above-1", "negative-max-tokens"],
)  # fmt: skip
def test_bad_input_gets_an_openai_error_never_a_500(
    router_server: RouterServer, body: bytes, status: int, code_or_param: str | None
) -> None:
    response = httpx.post(f"{router_server.openai_base_url}/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code_or_param is not None:
        assert code_or_param in (error["code"], error["param"]), error


def test_oversized_body_is_refused_with_413(router_server: RouterServer) -> None:
    huge = {"model": "gemma3:270m", "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    response = httpx.post(f"{router_server.openai_base_url}/chat/completions", json=huge, timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_unreachable_backend_is_a_502_in_the_same_format(tmp_path: Path) -> None:
    servers = start_router(tmp_path, [{"name": "ghost", "url": "http://127.0.0.1:9"}])
    router = next(servers)
    try:
        response = httpx.post(f"{router.openai_base_url}/chat/completions",
                              json={"model": "ghost", "messages": MESSAGES}, timeout=30)  # fmt: skip
        streamed = httpx.post(f"{router.openai_base_url}/chat/completions",
                              json={"model": "ghost", "messages": MESSAGES, "stream": True}, timeout=30)  # fmt: skip
    finally:
        servers.close()
    for answer in (response, streamed):
        assert answer.status_code == 502
        assert answer.json()["error"]["code"] == "upstream_unavailable"


# langchain-openai, as agent frameworks use it ------------------------------------------------------


@pytest.fixture
def langchain_chat(router_server: RouterServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    from langchain_openai import ChatOpenAI

    monkeypatch.delenv("LANGSMITH_TRACING", raising=False)  # no tracing calls out of this machine
    return ChatOpenAI(base_url=router_server.openai_base_url, api_key="unused", model="gemma", max_tokens=12,
                      temperature=0, max_retries=0, timeout=120)  # fmt: skip


def test_langchain_openai_invokes_and_streams(langchain_chat: Any) -> None:
    message = langchain_chat.invoke("Name three colours of the rainbow.")
    assert isinstance(message.content, str)
    assert message.content.strip()
    assert message.usage_metadata["output_tokens"] > 0
    chunks = list(langchain_chat.stream("Name three colours of the rainbow."))
    assert len(chunks) > 1
    assert "".join(chunk.content for chunk in chunks).strip()


def test_langchain_openai_tools_get_the_backends_answer(langchain_chat: Any) -> None:
    """bind_tools sends OpenAI's `tools`; this model's Ollama template has none, and Ollama says so. The
    router passes that on: the framework sees the backend's refusal, not a plain text answer."""

    def weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    with pytest.raises(openai.BadRequestError, match="does not support tools"):
        langchain_chat.bind_tools([weather]).invoke("What is the weather in Paris?")
