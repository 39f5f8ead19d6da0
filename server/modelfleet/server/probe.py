"""Backend reachability for /health and the admin API, from a background prober.

Health checks must be fast and never call a model, so they read what the prober saw last;
the probe itself asks for the server's version or model list, never for a generation.
"""

from __future__ import annotations

import asyncio
import time

from modelfleet.server.backends.base import request_headers
from modelfleet.server.engine_load import POLL_SECONDS, read_engine_load
from modelfleet.server.model_spec import ModelSpec
from modelfleet.server.registry import ServedModel
from modelfleet.server.services import Services
from modelfleet.server.upstream import UpstreamClient, UpstreamError

PROBE_PATHS = {"ollama": "/api/version", "openai": "/v1/models"}


async def probe_endpoint(http: UpstreamClient, spec: ModelSpec, endpoint: str) -> str | None:
    """None when the endpoint answered, else a short reason."""
    try:
        status, _, _ = await http.fetch("GET", f"{endpoint}{PROBE_PATHS[spec.api]}",
                                        request_headers(spec, "application/json"), deadline=2.0)  # fmt: skip
    except UpstreamError as exc:
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
            "endpoints": list(spec.endpoints),
            "checked_at": round(time.time(), 3),
        }
    services.reachability = results


def current_probe(services: Services, spec: ModelSpec) -> dict[str, object] | None:
    """The last probe of exactly the model's current replicas: None before the first probe, and after its
    replicas changed (a model that just came back from zero replicas is not unreachable)."""
    probe = services.reachability.get(spec.name)
    if probe is None or probe.get("endpoints") != list(spec.endpoints):
        return None
    return probe


async def engine_load_forever(services: Services, interval_seconds: float = POLL_SECONDS) -> None:
    """Read every vLLM replica's /metrics each `interval_seconds` into its model's `engine_load`."""

    async def refresh(model: ServedModel, endpoint: str) -> None:
        # Each reading lands as soon as it is read: a replica that does not answer (1 s) delays nobody's.
        reading = await read_engine_load(services.http, endpoint)
        if reading is None:
            model.engine_load.pop(endpoint, None)
        else:
            model.engine_load[endpoint] = reading

    while True:
        models = [model for model in services.registry.models() if model.spec.engine_metrics]
        for model in models:
            for gone in model.engine_load.keys() - set(model.spec.endpoints):
                del model.engine_load[gone]
        await asyncio.gather(*(refresh(model, endpoint) for model in models for endpoint in model.spec.endpoints))
        await asyncio.sleep(interval_seconds)


async def probe_forever(services: Services, interval_seconds: float) -> None:
    while True:
        await probe_once(services)
        await asyncio.sleep(interval_seconds)
