"""vLLM's own load in the replica choice: its queue when the router's count is lower, its KV cache as a veto."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import cast

import pytest

from modelfleet.server.engine_load import (
    KV_PRESSURE,
    STALE_SECONDS,
    EngineLoad,
    effective_outstanding,
    parse_engine_load,
    under_pressure,
)
from modelfleet.server.metrics import RouterMetrics
from modelfleet.server.model_spec import ModelSpec
from modelfleet.server.probe import engine_load_forever
from modelfleet.server.registry import ServedModel
from modelfleet.server.routing import ranked
from modelfleet.server.services import Services
from modelfleet.server.upstream import UpstreamClient

pytestmark = pytest.mark.unit

# As vLLM 0.32 writes it (two engines of a data-parallel server are summed).
METRICS = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="modelfleet/gemma-3-270m"} 1.0
vllm:num_requests_running{engine="1",model_name="modelfleet/gemma-3-270m"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="modelfleet/gemma-3-270m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="modelfleet/gemma-3-270m"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="modelfleet/gemma-3-270m"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="modelfleet/gemma-3-270m"} 1234.0
"""


def test_vllms_metrics_give_its_queue_and_kv_cache() -> None:
    reading = parse_engine_load(METRICS, read_at=5.0)
    assert reading == EngineLoad(running=3, waiting=3, kv_cache_usage=0.25, read_at=5.0)
    assert reading.requests == 6


@pytest.mark.parametrize("text", [b"", b"# TYPE x gauge\nollama_up 1\n",
                                  b'vllm:num_requests_running{engine="0"} 1.0\n'])  # fmt: skip
def test_a_server_without_those_gauges_gives_no_reading(text: bytes) -> None:
    assert parse_engine_load(text, read_at=0.0) is None


def reading(requests: int, kv: float = 0.1, at: float = 100.0) -> EngineLoad:
    return EngineLoad(running=min(requests, 1), waiting=max(0, requests - 1), kv_cache_usage=kv, read_at=at)


def test_the_engines_queue_counts_when_it_is_longer_than_the_routers_own() -> None:
    own = {"a": 2, "b": 0, "c": 1}
    engines = {"a": reading(1), "b": reading(5), "d": reading(9)}
    assert effective_outstanding(own, engines, now=101.0) == {"a": 2, "b": 5, "c": 1}
    # A stale reading (the replica stopped answering /metrics) is ignored.
    assert effective_outstanding(own, engines, now=100.0 + STALE_SECONDS + 0.1) == own


def test_a_full_kv_cache_is_no_prefixs_home_unless_every_cache_is_full() -> None:
    engines = {"a": reading(0, kv=KV_PRESSURE), "b": reading(0, kv=0.5)}
    assert under_pressure(engines, ["a", "b"], now=100.0) == {"a"}
    assert under_pressure({"a": engines["a"], "b": reading(0, kv=0.99)}, ["a", "b"], now=100.0) == set()
    assert under_pressure(engines, ["a", "b"], now=200.0) == set(), "stale readings veto nothing"


def test_the_replica_choice_follows_the_engines() -> None:
    endpoints = ("http://10.0.0.1:8000", "http://10.0.0.2:8000")
    spec = ModelSpec(name="m", api="openai", upstream_model="m", endpoints=endpoints, max_in_flight_per_replica=4,
                     engine_metrics=True, routing="prefix")  # fmt: skip
    model = ServedModel(spec, RouterMetrics.create())
    key = next(k for k in (bytes([i]) * 16 for i in range(64)) if ranked(k, list(endpoints))[0] == endpoints[0])
    assert model.pick_endpoint(affinity=key) == endpoints[0]
    model.release_endpoint(endpoints[0])
    now = time.monotonic()
    # The home replica's cache is full: the prefix goes to the other one.
    model.engine_load = {endpoints[0]: reading(0, kv=0.95, at=now), endpoints[1]: reading(0, at=now)}
    assert model.pick_endpoint(affinity=key) == endpoints[1]
    model.release_endpoint(endpoints[1])
    # Least loaded by the engines' own queues: other routers keep the first replica busy.
    model.engine_load = {endpoints[0]: reading(4, at=now), endpoints[1]: reading(0, at=now)}
    assert model.pick_endpoint() == endpoints[1]


def test_the_poller_reads_every_model_while_one_replica_hangs() -> None:
    """One replica that never answers /metrics holds up no other model's reading: they are all read at
    once. Read one model after another, the others wait out its deadline and their readings go stale."""
    order: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (
            len(METRICS), METRICS))  # fmt: skip
        await writer.drain()
        writer.close()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the poller gives up on it and closes
        order.append("the hanging read given up")
        writer.close()

    async def scenario() -> None:
        answering = await asyncio.start_server(answer, "127.0.0.1", 0)
        hanging = await asyncio.start_server(hang, "127.0.0.1", 0)
        good = f"http://127.0.0.1:{answering.sockets[0].getsockname()[1]}"
        silent = f"http://127.0.0.1:{hanging.sockets[0].getsockname()[1]}"

        def served(name: str, *endpoints: str) -> ServedModel:
            spec = ModelSpec(name=name, api="openai", upstream_model=name, endpoints=endpoints, engine_metrics=True)
            return ServedModel(spec, RouterMetrics.create())

        # The hanging replica's model comes first, as the registry may list it.
        models = [served("a", silent, good), served("b", good), served("c", good)]
        http = UpstreamClient(connect_timeout=1.0, read_timeout=5.0)
        services = cast(Services, SimpleNamespace(registry=SimpleNamespace(models=lambda: models), http=http))
        poller = asyncio.create_task(engine_load_forever(services, interval_seconds=0.05))
        try:
            # Until the poller gives up on the hanging replica (its 1 s deadline), noting when the
            # other models' readings arrive.
            while "the hanging read given up" not in order:
                if "the others read" not in order and all(good in model.engine_load for model in models[1:]):
                    order.append("the others read")
                await asyncio.sleep(0.01)
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
            answering.close()
            hanging.close()
            await http.aclose()
        assert order[:2] == ["the others read", "the hanging read given up"], order
        assert silent not in models[0].engine_load

    asyncio.run(scenario())
