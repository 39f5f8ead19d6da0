"""Cache keys, what is cacheable, coalescing, and the SSE assembly/replay round trip."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from modelfleet.server.cache import MemoryStore, ResponseCache, cache_key, cacheable
from modelfleet.server.metrics import RouterMetrics
from modelfleet.server.streaming import Assembler, replay_chunks

pytestmark = pytest.mark.unit


def memory_cache(ttl_seconds: float = 60) -> ResponseCache:
    return ResponseCache(MemoryStore(8), max_size=8, ttl_seconds=ttl_seconds, metrics=RouterMetrics.create())


BODY = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 8, "seed": 1}


def test_key_ignores_field_order_and_transport_fields_but_not_sampling() -> None:
    base = cache_key("m", "chat", BODY)
    assert base == cache_key("m", "chat", dict(reversed(list(BODY.items()))))
    assert base == cache_key("m", "chat", {**BODY, "stream": True, "stream_options": {"x": 1}})
    assert base != cache_key("m", "chat", {**BODY, "max_tokens": 9})
    assert base != cache_key("m", "completion", BODY)
    assert base != cache_key("other", "chat", BODY)
    assert base != cache_key("m", "chat", BODY, namespace="key:team-a"), "per-key namespaces never share"


@pytest.mark.parametrize(
    ("body", "expected"),
    [({"temperature": 0}, True), ({"temperature": 0.7, "seed": 4}, True), ({"temperature": 0.7}, False), ({}, False),
     ({"seed": 2}, True)],
)  # fmt: skip
def test_only_deterministic_requests_are_cacheable(body: dict[str, Any], expected: bool) -> None:
    assert cacheable(body) is expected


def test_identical_concurrent_requests_share_one_computation() -> None:
    async def scenario() -> None:
        cache = memory_cache()
        calls = 0
        gate = asyncio.Event()

        async def compute() -> dict[str, Any]:
            nonlocal calls
            calls += 1
            await gate.wait()
            return {"answer": 42}

        tasks = [asyncio.create_task(cache.get_or_compute("m", "k", None, compute)) for _ in range(20)]
        await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(*tasks)
        assert calls == 1
        assert {how for _, how in results} == {"miss", "coalesced"}
        assert [how for _, how in results].count("miss") == 1
        assert all(result == {"answer": 42} for result, _ in results)
        assert await cache.get_or_compute("m", "k", None, compute) == ({"answer": 42}, "hit")
        assert (await cache.stats())["size"] == 1

    asyncio.run(scenario())


def test_failures_are_shared_and_not_stored() -> None:
    async def scenario() -> None:
        cache = memory_cache()

        async def broken() -> dict[str, Any]:
            await asyncio.sleep(0.01)
            raise RuntimeError("backend down")

        outcomes = await asyncio.gather(
            *(cache.get_or_compute("m", "k", None, broken) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(outcome, RuntimeError) for outcome in outcomes)
        assert (await cache.stats())["size"] == 0

    asyncio.run(scenario())


def test_a_shared_answer_is_stopped_only_when_every_waiting_client_left() -> None:
    async def scenario() -> None:
        cache = memory_cache()
        started, stopped = asyncio.Event(), asyncio.Event()

        async def endless() -> dict[str, Any]:
            started.set()
            try:
                await asyncio.sleep(3600)
            finally:
                stopped.set()
            return {}

        first = asyncio.create_task(cache.get_or_compute("m", "k", None, endless))
        second = asyncio.create_task(cache.get_or_compute("m", "k", None, endless))
        await started.wait()
        first.cancel()
        await asyncio.sleep(0.01)
        assert not stopped.is_set(), "the second client still waits for the answer"
        second.cancel()
        await asyncio.wait_for(stopped.wait(), 1)

        async def answer() -> dict[str, Any]:
            return {"answer": 1}

        # The stopped computation is forgotten: the next identical request starts a new one.
        assert await cache.get_or_compute("m", "k", None, answer) == ({"answer": 1}, "miss")

    asyncio.run(scenario())


def test_a_stream_assembles_into_the_response_it_replays() -> None:
    head = {"id": "c1", "created": 5, "model": "m"}
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chunks = [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**head, "choices": [], "usage": usage},
    ]  # fmt: skip
    assembler = Assembler(chat=True)
    for chunk in chunks:
        assembler.add(chunk)
    complete = assembler.result()
    assert complete is not None
    assert complete["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert complete["usage"]["total_tokens"] == 5
    replayed = list(replay_chunks(complete))
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in replayed if p["choices"]) == "Hello"
    assert replayed[-1] == {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
    assert [p["choices"][0]["finish_reason"] for p in replayed if p["choices"]] == [None, "stop"]
    unfinished = Assembler(chat=True)
    unfinished.add(chunks[0])
    assert unfinished.result() is None, "an interrupted stream is never cached"
    # A stream that will not be cached keeps only its usage (the token charge needs it).
    uncached = Assembler(chat=True, rebuild=False)
    for chunk in chunks:
        uncached.add(chunk)
    assert (uncached.usage, uncached.parts, uncached.result()) == (usage, [], None)


def test_entries_expire_with_their_own_ttl() -> None:
    async def scenario() -> None:
        store = MemoryStore(8)
        await store.set("short", {"a": 1}, ttl_seconds=0.05)
        await store.set("long", {"b": 2}, ttl_seconds=60)
        await asyncio.sleep(0.1)
        assert await store.get("short") is None
        assert await store.get("long") == {"b": 2}

    asyncio.run(scenario())


def test_the_store_holds_at_most_max_size_entries() -> None:
    async def scenario() -> None:
        store = MemoryStore(2)
        for index in range(5):
            await store.set(str(index), {"i": index}, ttl_seconds=60)
        assert await store.size() == 2
        assert await store.get("4") == {"i": 4}

    asyncio.run(scenario())
