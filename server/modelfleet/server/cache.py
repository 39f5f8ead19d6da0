"""Exact-match response cache (in-process LRU+TTL) with coalescing of identical concurrent requests.

The key is the SHA-256 of the canonical request: model, path, messages or prompt, and every
parameter that changes the output.  Only complete, successful responses are stored.  Requests
sampled at temperature > 0 without a seed are not cached: their answers are meant to differ.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from cachetools import TTLCache

# Fields that do not change what the model generates, so they are left out of the key.
NOT_IN_KEY = frozenset({"stream", "stream_options", "user"})


def cache_key(model: str, path: str, body: dict[str, Any]) -> str:
    canonical = {key: value for key, value in body.items() if key not in NOT_IN_KEY}
    payload = orjson.dumps({"model": model, "path": path, "request": canonical}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(payload).hexdigest()


def cacheable(body: dict[str, Any]) -> bool:
    temperature = body.get("temperature")
    deterministic = temperature == 0 or body.get("seed") is not None
    # Without an explicit temperature the backend samples with its default (> 0).
    return deterministic and (temperature is not None or body.get("seed") is not None)


class ResponseCache:
    def __init__(self, max_size: int, ttl_seconds: float) -> None:
        self.max_size = max_size
        self.ttl_seconds = ttl_seconds
        self._entries: TTLCache[str, dict[str, Any]] = TTLCache(maxsize=max_size, ttl=ttl_seconds)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    async def get_or_compute(
        self, key: str, compute: Callable[[], Awaitable[dict[str, Any]]]
    ) -> tuple[dict[str, Any], str]:
        """The cached response, or the one a concurrent identical request is computing, or a new one.

        Returns the response and how it was obtained: "hit", "coalesced" or "miss".
        """
        cached = self.get(key)
        if cached is not None:
            return cached, "hit"
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending), "coalesced"
        # A task of its own: if the first client leaves, the others still get the answer.
        task = asyncio.ensure_future(self._compute_and_store(key, compute))
        self._pending[key] = task
        return await asyncio.shield(task), "miss"

    async def _compute_and_store(self, key: str, compute: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        try:
            result = await compute()
            self._entries[key] = result
            return result
        finally:
            self._pending.pop(key, None)

    def store(self, key: str, response: dict[str, Any]) -> None:
        self._entries[key] = response

    def stats(self) -> dict[str, Any]:
        lookups = self.hits + self.misses
        return {
            "size": len(self._entries),
            "max_size": self.max_size,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / lookups, 4) if lookups else 0.0,
            "ttl_seconds": self.ttl_seconds,
        }
