"""Exact-match response cache with coalescing of identical concurrent requests.

The key is the SHA-256 of the canonical request: model, kind, messages or prompt, and every
parameter that changes the output, plus the tenant's namespace when the cache is per key.
Only complete, successful responses are stored.  Storage is in-process (LRU + per-entry TTL)
by default, or Redis so that every router replica shares it.  A Redis failure never fails a
request: the lookup counts as a bypass and the answer comes from the backend.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson
from cachetools import TLRUCache
from redis.asyncio import Redis
from redis.exceptions import RedisError

from modelfleet.server.metrics import RouterMetrics

logger = logging.getLogger(__name__)

# Fields that do not change what the model generates, so they are left out of the key.
# Fields that never change an answer; every other field of the request (tools, response_format,
# logprobs, vendor extensions) is part of the key.
NOT_IN_KEY = frozenset({"stream", "stream_options", "user", "metadata"})

Lookup = Literal["hit", "miss", "coalesced", "bypass"]


def cache_key(model: str, kind: str, body: dict[str, Any], namespace: str = "") -> str:
    canonical = {key: value for key, value in body.items() if key not in NOT_IN_KEY}
    payload = orjson.dumps(
        {"model": model, "kind": kind, "namespace": namespace, "request": canonical}, option=orjson.OPT_SORT_KEYS
    )
    return hashlib.sha256(payload).hexdigest()


def cacheable(body: dict[str, Any]) -> bool:
    """Only deterministic requests: temperature 0, or a fixed seed.

    A request sampled at temperature > 0 without a seed asks for a fresh draw each time, so a
    cached answer would change its meaning.  Without an explicit temperature the backend samples
    with its default (> 0), so such requests are not cached either.
    """
    return body.get("temperature") == 0 or body.get("seed") is not None


class StoreUnavailable(Exception):
    """The cache's store failed; the caller bypasses the cache."""


class CacheStore(Protocol):
    async def get(self, key: str) -> dict[str, Any] | None: ...
    async def set(self, key: str, value: dict[str, Any], ttl_seconds: float) -> None: ...
    async def size(self) -> int | None: ...


@dataclass
class _Entry:
    value: dict[str, Any]
    ttl_seconds: float


class MemoryStore:
    def __init__(self, max_size: int) -> None:
        self._entries: TLRUCache[str, _Entry] = TLRUCache(
            maxsize=max_size, ttu=lambda _key, entry, now: now + entry.ttl_seconds, timer=time.monotonic
        )

    async def get(self, key: str) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        return entry.value if entry is not None else None

    async def set(self, key: str, value: dict[str, Any], ttl_seconds: float) -> None:
        self._entries[key] = _Entry(value, ttl_seconds)

    async def size(self) -> int | None:
        return len(self._entries)


class RedisStore:
    """Responses as JSON under `prefix`, expiring with Redis's own TTL; eviction is Redis's maxmemory policy."""

    def __init__(self, redis: Redis, circuit: RedisCircuit, prefix: str = "modelfleet:cache:") -> None:
        self.redis = redis
        self.circuit = circuit
        self.prefix = prefix

    async def get(self, key: str) -> dict[str, Any] | None:
        raw = await self._call(self.redis.get(self.prefix + key))
        return orjson.loads(raw) if raw else None

    async def set(self, key: str, value: dict[str, Any], ttl_seconds: float) -> None:
        await self._call(self.redis.set(self.prefix + key, orjson.dumps(value), px=max(1, int(ttl_seconds * 1000))))

    async def size(self) -> int | None:
        # DBSIZE counts the whole database: the chart gives the router a Redis of its own.
        return int(await self._call(self.redis.dbsize())) if self.circuit.available else None

    async def _call(self, command: Awaitable[Any]) -> Any:
        if not self.circuit.available:
            if asyncio.iscoroutine(command):
                command.close()
            raise StoreUnavailable("redis is down")
        try:
            return await command
        except (RedisError, OSError) as exc:
            self.circuit.failed(exc)
            raise StoreUnavailable(str(exc)) from exc


class RedisCircuit:
    """Whether Redis is usable: opened by a failed call, closed again by the monitor's next PING.

    While open, the cache skips Redis without waiting for a timeout on every request.
    """

    def __init__(self, redis: Redis, metrics: RouterMetrics, interval_seconds: float = 1.0) -> None:
        self.redis = redis
        self.metrics = metrics
        self.interval_seconds = interval_seconds
        self.available = True
        self.last_error = ""

    def failed(self, exc: BaseException) -> None:
        if self.available:
            logger.warning("redis failed (%s): bypassing the cache until it answers again", type(exc).__name__)
        self.available = False
        self.last_error = type(exc).__name__
        if self.metrics.redis_up is not None:
            self.metrics.redis_up.set(0)

    def recovered(self) -> None:
        if not self.available:
            logger.info("redis answers again: cache back on")
        self.available = True
        self.last_error = ""
        if self.metrics.redis_up is not None:
            self.metrics.redis_up.set(1)

    async def monitor(self) -> None:
        while True:
            try:
                await self.redis.ping()
            except (RedisError, OSError) as exc:
                self.failed(exc)
            else:
                self.recovered()
            await asyncio.sleep(self.interval_seconds)


class ResponseCache:
    def __init__(self, store: CacheStore, max_size: int, ttl_seconds: float, metrics: RouterMetrics) -> None:
        self.store = store
        self.max_size = max_size
        self.ttl_seconds = ttl_seconds
        self.metrics = metrics
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: dict[str, int] = {}  # clients waiting for each pending answer
        self.hits = 0
        self.misses = 0
        self.bypassed = 0

    async def get(self, model: str, key: str) -> tuple[dict[str, Any] | None, Lookup]:
        try:
            entry = await self.store.get(key)
        except StoreUnavailable:
            self.metrics.cache_errors.inc()
            self.bypassed += 1
            self.metrics.child(self.metrics.cache_lookups, model, "bypass").inc()
            return None, "bypass"
        result: Lookup = "hit" if entry is not None else "miss"
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        self.metrics.child(self.metrics.cache_lookups, model, result).inc()
        return entry, result

    async def get_or_compute(
        self, model: str, key: str, ttl_seconds: float | None, compute: Callable[[], Awaitable[dict[str, Any]]]
    ) -> tuple[dict[str, Any], Lookup]:
        """The cached response, or the one a concurrent identical request is computing, or a new one."""
        pending = self._pending.get(key)
        if pending is not None:
            self.hits += 1
            self.metrics.child(self.metrics.cache_lookups, model, "coalesced").inc()
            return await self._share(key, pending), "coalesced"
        cached, how = await self.get(model, key)
        if cached is not None:
            return cached, how
        pending = self._pending.get(key)  # another request may have started while we asked the store
        if pending is not None:
            return await self._share(key, pending), "coalesced"
        # A task of its own: if the first client leaves, the others still get the answer.
        task = asyncio.ensure_future(self._compute_and_store(key, ttl_seconds, compute))
        self._pending[key] = task
        return await self._share(key, task), how

    async def _share(self, key: str, task: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
        """Wait for a shared answer; when the last client waiting for it leaves, stop generating it."""
        self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            return await asyncio.shield(task)
        finally:
            self._waiters[key] -= 1
            if self._waiters[key] == 0:
                del self._waiters[key]
                if not task.done():
                    if self._pending.get(key) is task:
                        del self._pending[key]  # a request arriving now starts afresh
                    task.cancel()

    async def _compute_and_store(
        self, key: str, ttl_seconds: float | None, compute: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        try:
            result = await compute()
            await self.put(key, result, ttl_seconds)
            return result
        finally:
            if self._pending.get(key) is asyncio.current_task():
                del self._pending[key]

    async def put(self, key: str, response: dict[str, Any], ttl_seconds: float | None) -> None:
        try:
            await self.store.set(key, response, ttl_seconds or self.ttl_seconds)
        except StoreUnavailable:
            self.metrics.cache_errors.inc()

    async def stats(self) -> dict[str, Any]:
        lookups = self.hits + self.misses
        try:
            size = await asyncio.wait_for(self.store.size(), 0.25)
        except (StoreUnavailable, TimeoutError):
            size = None
        if size is not None:
            self.metrics.cache_entries.set(size)
        return {
            "backend": "redis" if isinstance(self.store, RedisStore) else "memory",
            "available": not isinstance(self.store, RedisStore) or self.store.circuit.available,
            "size": size,
            "max_size": self.max_size,
            "hits": self.hits,
            "misses": self.misses,
            "bypassed": self.bypassed,
            "hit_rate": round(self.hits / lookups, 4) if lookups else 0.0,
            "ttl_seconds": self.ttl_seconds,
        }
