"""The response cache in front of the real Ollama: hits skip the backend, identical requests coalesce."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import OllamaServer, RouterServer, expect_chat_calls, settled_chat_calls, start_router

pytestmark = pytest.mark.integration


@pytest.fixture
def router(ollama_server: OllamaServer, tmp_path: Path) -> Iterator[RouterServer]:
    yield from start_router(tmp_path, [{"name": ollama_server.model, "url": ollama_server.base_url}])


def chat(prompt: str, **extra: object) -> dict[str, object]:
    return {"model": "gemma3:270m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, **extra}


def test_a_repeated_request_is_served_from_the_cache_without_a_backend_call(
    router: RouterServer, ollama_server: OllamaServer
) -> None:
    url = f"{router.openai_base_url}/chat/completions"
    body = chat("Name a colour.", temperature=0)
    before = settled_chat_calls(ollama_server)
    first = httpx.post(url, json=body, timeout=60)
    expect_chat_calls(ollama_server, before + 1)
    calls = before + 1
    second = httpx.post(url, json=body, timeout=60)
    assert first.headers["x-modelfleet-cache"] == "miss"
    assert second.headers["x-modelfleet-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    expect_chat_calls(ollama_server, calls)  # a hit must not reach the backend

    # The same request streamed is replayed from the cache as SSE.
    with httpx.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                      timeout=60) as streamed:  # fmt: skip
        assert streamed.headers["x-modelfleet-cache"] == "hit"
        events = [line for line in streamed.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if p["choices"])
    assert text == first.json()["choices"][0]["message"]["content"]
    assert payloads[-1]["usage"] == first.json()["usage"]
    expect_chat_calls(ollama_server, calls)

    health = httpx.get(f"{router.base_url}/health", timeout=5).json()["cache"]
    assert health["hits"] >= 2
    assert health["size"] == 1
    assert {"size", "max_size", "hits", "misses", "hit_rate", "ttl_seconds"} <= set(health)
    assert health["backend"] == "memory"


def test_a_streamed_answer_is_cached_once_complete(router: RouterServer, ollama_server: OllamaServer) -> None:
    url = f"{router.openai_base_url}/chat/completions"
    body = chat("Count to five.", temperature=0)
    before = settled_chat_calls(ollama_server)
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as streamed:
        streamed_events = [line for line in streamed.iter_lines() if line]
    assert not any('"usage"' in e and '"choices":[]' in e for e in streamed_events), "usage only when asked for"
    expect_chat_calls(ollama_server, before + 1)
    calls = before + 1
    cached = httpx.post(url, json=body, timeout=60)
    assert cached.headers["x-modelfleet-cache"] == "hit"
    expect_chat_calls(ollama_server, calls)


def test_twenty_identical_concurrent_requests_cause_one_generation(
    router: RouterServer, ollama_server: OllamaServer
) -> None:
    url = f"{router.openai_base_url}/chat/completions"
    body = chat("Describe the sea in one line.", temperature=0, max_tokens=48)
    calls = settled_chat_calls(ollama_server)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def ask() -> None:
        response = httpx.post(url, json=body, timeout=120)
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(answers) == 20
    assert all(answer.status_code == 200 for answer in answers)
    assert len({answer.text for answer in answers}) == 1
    expect_chat_calls(ollama_server, calls + 1)
    kinds = sorted(answer.headers["x-modelfleet-cache"] for answer in answers)
    assert kinds.count("miss") == 1


def test_sampled_requests_and_no_cache_requests_bypass_the_cache(
    router: RouterServer, ollama_server: OllamaServer
) -> None:
    url = f"{router.openai_base_url}/chat/completions"
    calls = settled_chat_calls(ollama_server)
    sampled = chat("Pick a number.", temperature=0.9)
    for _ in range(2):
        assert httpx.post(url, json=sampled, timeout=60).headers["x-modelfleet-cache"] == "bypass"
    pinned = chat("Pick a letter.", temperature=0)
    for _ in range(2):
        response = httpx.post(url, json=pinned, headers={"cache-control": "no-cache"}, timeout=60)
        assert response.headers["x-modelfleet-cache"] == "bypass"
    expect_chat_calls(ollama_server, calls + 4)
