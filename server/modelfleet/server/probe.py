"""Backend reachability for /health and the admin API, from a background prober.

Health checks must be fast and never call a model, so they read what the prober saw last;
the probe itself asks for the server's version or model list, never for a generation.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from modelfleet.server.backends.base import UPSTREAM_FAILURES, request_headers
from modelfleet.server.registry import ModelSpec
from modelfleet.server.services import Services

PROBE_PATHS = {"ollama": "/api/version", "openai": "/v1/models"}


async def probe_endpoint(session: aiohttp.ClientSession, spec: ModelSpec, endpoint: str) -> str | None:
    """None when the endpoint answered, else a short reason."""
    try:
        async with session.get(f"{endpoint}{PROBE_PATHS[spec.api]}", timeout=aiohttp.ClientTimeout(total=2.0),
                               headers=request_headers(spec, "application/json")) as response:  # fmt: skip
            status = response.status
    except UPSTREAM_FAILURES as exc:
        return type(exc).__name__
    return None if status < 500 else f"HTTP {status}"


async def probe_once(services: Services) -> None:
    results: dict[str, dict[str, object]] = {}
    for model in services.registry.models():
        spec = model.spec
        errors = await asyncio.gather(*(probe_endpoint(services.http, spec, url) for url in spec.endpoints))
        failing = [f"{url}: {error}" for url, error in zip(spec.endpoints, errors, strict=True) if error]
        results[model.name] = {
            "reachable": bool(spec.endpoints) and len(failing) < len(spec.endpoints),
            "failing": failing,
            "checked_at": round(time.time(), 3),
        }
    services.reachability = results


async def probe_forever(services: Services, interval_seconds: float) -> None:
    while True:
        await probe_once(services)
        await asyncio.sleep(interval_seconds)
