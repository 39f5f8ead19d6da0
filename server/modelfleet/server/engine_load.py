"""What vLLM replicas say of their own load, for the replica choice.

The router counts the requests it has sent to each replica and not yet seen finish. That is exact
for one router, but each router replica sees only its own share, and an engine can be slow for
reasons no router sees (a long prompt being prefilled, preempted sequences). vLLM publishes its
state on /metrics; the router reads it about once a second per replica:

- `vllm:num_requests_running` and `vllm:num_requests_waiting`: the engine's own queue, every
  router's requests included. The replica choice takes the larger of this and the router's own
  count, so a replica that other routers keep busy looks busy here too.
- `vllm:kv_cache_usage_perc`: how full the KV cache is. Near full, vLLM preempts sequences and
  evicts cached prefixes, so a prefix routed there would find its cache gone and push another
  conversation's out: a replica at or above `KV_PRESSURE` is no prefix's home while another is below.

A reading older than `STALE_SECONDS` is ignored (the replica stopped answering /metrics, or the
router just started): the router's own counts decide then, as for engines without such metrics.

How this compares with llm-d's scheduler: its filters and weighted scorers (prefix cache, KV-cache
utilization, queue depth) pick a pod per request, from an approximate index of each pod's cached
blocks, fed by KV events. Here the prefix is kept by rendezvous hashing with bounded load, which
needs no index and no shared state between routers, and the engine's own queue and KV pressure
correct the load picture and veto a full cache. What that leaves out: an exact view of which
blocks each replica holds, so a prefix that was evicted is still routed to its home.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from modelfleet.server.upstream import UpstreamClient, UpstreamError

# vLLM preempts running sequences when its KV cache is full; a little below that is "full".
KV_PRESSURE = 0.9
STALE_SECONDS = 3.0
POLL_SECONDS = 1.0
# One line of Prometheus text: name, labels, value (timestamps are not sent by vLLM).
SAMPLE = re.compile(rb"^(vllm:[a-z_]+)(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)$", re.M)
GAUGES = {b"vllm:num_requests_running", b"vllm:num_requests_waiting", b"vllm:kv_cache_usage_perc"}


@dataclass(frozen=True)
class EngineLoad:
    """One reading of a replica's /metrics."""

    running: int
    waiting: int
    kv_cache_usage: float  # 0..1
    read_at: float  # time.monotonic()

    @property
    def requests(self) -> int:
        return self.running + self.waiting

    def fresh(self, now: float) -> bool:
        return now - self.read_at <= STALE_SECONDS


def parse_engine_load(text: bytes, read_at: float) -> EngineLoad | None:
    """The engine's load from vLLM's Prometheus text, summed over its engines; None if it has none."""
    found: dict[bytes, float] = {}
    for name, value in SAMPLE.findall(text):
        if name in GAUGES:
            number = float(value)
            if not math.isnan(number):
                found[name] = found.get(name, 0.0) + number
    if not found.keys() >= GAUGES:
        return None
    return EngineLoad(
        running=round(found[b"vllm:num_requests_running"]),
        waiting=round(found[b"vllm:num_requests_waiting"]),
        kv_cache_usage=found[b"vllm:kv_cache_usage_perc"],
        read_at=read_at,
    )


def effective_outstanding(own: Mapping[str, int], engines: Mapping[str, EngineLoad], now: float) -> dict[str, int]:
    """Each replica's load for the choice: the router's own count, or the engine's if that is higher."""
    load = dict(own)
    for endpoint, reading in engines.items():
        if endpoint in load and reading.fresh(now):
            load[endpoint] = max(load[endpoint], reading.requests)
    return load


def under_pressure(engines: Mapping[str, EngineLoad], endpoints: list[str], now: float) -> set[str]:
    """The replicas whose KV cache is full enough that a prefix should go elsewhere, unless all are."""
    readings = {endpoint: engines.get(endpoint) for endpoint in endpoints}
    full = {
        endpoint
        for endpoint, reading in readings.items()
        if reading is not None and reading.fresh(now) and reading.kv_cache_usage >= KV_PRESSURE
    }
    return set() if full >= set(endpoints) else full


async def read_engine_load(http: UpstreamClient, endpoint: str) -> EngineLoad | None:
    try:
        status, _, body = await http.fetch("GET", f"{endpoint}/metrics", {"accept": "text/plain"}, deadline=1.0)
    except UpstreamError:
        return None
    return parse_engine_load(body, time.monotonic()) if status == 200 else None
