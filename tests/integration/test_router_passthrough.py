"""OpenAI fields the router does not act on, in front of the real Ollama: JSON mode, JSON schemas,
tools and logprobs behave through the router as they do when sent to Ollama directly, through both
of the router's ways to Ollama (its OpenAI-compatible /v1, and its native /api/chat)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import OllamaServer, RouterServer, start_router

pytestmark = pytest.mark.integration

ASK = [{"role": "user", "content": "Give me one colour of the rainbow, as JSON."}]
COLOUR_SCHEMA = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "weather", "description": "The weather in a city.",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}  # fmt: skip
# The router's model names: one reaches Ollama through /v1, the other through /api/chat.
ROUTES = ["via-openai", "via-native"]


@pytest.fixture(scope="module")
def router(ollama_server: OllamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterServer]:
    models: list[dict[str, object]] = [
        {"name": "via-openai", "url": ollama_server.base_url, "upstream_model": ollama_server.model},
        {"name": "via-native", "url": ollama_server.base_url, "upstream_model": ollama_server.model, "api": "ollama"},
    ]
    yield from start_router(tmp_path_factory.mktemp("router"), models)


def chat(base_url: str, model: str, **fields: Any) -> httpx.Response:
    body = {"model": model, "messages": ASK, "max_tokens": 96, "temperature": 0, **fields}
    return httpx.post(f"{base_url}/chat/completions", json=body, timeout=120)


def direct(ollama: OllamaServer, **fields: Any) -> httpx.Response:
    return chat(ollama.openai_base_url, ollama.model, **fields)


def content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["message"]["content"]
    return text


def test_a_json_schema_answer_is_that_json_as_ollama_gives_it(
    router: RouterServer, ollama_server: OllamaServer
) -> None:
    colours = ["red", "orange", "yellow", "green", "blue", "indigo", "violet"]
    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": colours}}, "required": ["colour"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "colour", "schema": schema}}
    expected = json.loads(content(direct(ollama_server, response_format=response_format, seed=7)))
    assert expected["colour"] in colours
    for model in ROUTES:
        got = json.loads(content(chat(router.openai_base_url, model, response_format=response_format, seed=7,
                                      use_cache=False)))  # fmt: skip
        assert got == expected, model


def test_json_mode_reaches_ollama(router: RouterServer, ollama_server: OllamaServer) -> None:
    """JSON mode constrains Ollama's sampling: the answer is the one Ollama gives directly, and it is not the
    free text the same request gets without it. (This small base model, left free, writes JSON until its
    token limit, so "the whole answer parses" is shown with a schema above.)"""
    json_mode = {"response_format": {"type": "json_object"}, "seed": 7, "use_cache": False}
    expected = content(direct(ollama_server, **{k: v for k, v in json_mode.items() if k != "use_cache"}))
    assert expected.lstrip().startswith("{"), expected
    assert content(chat(router.openai_base_url, "via-openai", **json_mode)) == expected
    assert content(chat(router.openai_base_url, "via-native", **json_mode)).lstrip().startswith("{")
    free = content(chat(router.openai_base_url, "via-openai", seed=7, use_cache=False))
    assert free != expected


def test_tools_behave_as_they_do_directly(router: RouterServer, ollama_server: OllamaServer) -> None:
    """This model's template has no tools, so Ollama refuses them: the router must not answer in text."""
    expected = direct(ollama_server, tools=[WEATHER_TOOL])
    for model in ROUTES:
        got = chat(router.openai_base_url, model, tools=[WEATHER_TOOL])
        assert got.status_code == expected.status_code, (model, got.text, expected.text)
        if expected.status_code != 200:
            assert got.json()["error"]["code"] == "upstream_rejected"
            assert "does not support tools" in got.json()["error"]["message"], got.text
            assert "does not support tools" in expected.text
    # What Ollama's native API cannot express at all is the router's own 400, naming the field.
    refused = chat(router.openai_base_url, "via-native", tools=[WEATHER_TOOL], tool_choice="required")
    assert refused.status_code == 400
    assert (refused.json()["error"]["code"], refused.json()["error"]["param"]) == ("unsupported_parameter",
                                                                                   "tool_choice")  # fmt: skip


def test_logprobs_pass_through(router: RouterServer) -> None:
    for model in ROUTES:
        response = chat(router.openai_base_url, model, logprobs=True, top_logprobs=2, max_tokens=4, use_cache=False)
        assert response.status_code == 200, response.text
        entries = response.json()["choices"][0]["logprobs"]["content"]
        assert entries, response.text
        assert all(isinstance(e["token"], str) and e["logprob"] <= 0 for e in entries), entries
        assert all(len(e["top_logprobs"]) == 2 for e in entries), entries


def test_the_cache_never_serves_an_answer_made_for_other_tools_or_formats(router: RouterServer) -> None:
    def cache_header(**fields: Any) -> str:
        response = chat(router.openai_base_url, "via-openai", max_tokens=24, seed=7, **fields)
        assert response.status_code in (200, 400), response.text
        return response.headers.get("x-modelfleet-cache", "none")

    assert cache_header() == "miss"
    assert cache_header() == "hit"
    assert cache_header(response_format={"type": "json_object"}) == "miss"
    assert cache_header(response_format={"type": "json_object"}) == "hit"
    assert cache_header(response_format={"type": "json_schema",
                                         "json_schema": {"name": "c", "schema": COLOUR_SCHEMA}}) == "miss"  # fmt: skip
    assert cache_header(tools=[WEATHER_TOOL]) != "hit"  # refused by Ollama, never cached
