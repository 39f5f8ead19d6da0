"""Health endpoints: fast, and they never call a model (reachability comes from the background prober)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from modelfleet.server.errors import OrjsonResponse, RouterError
from modelfleet.server.probe import current_probe
from modelfleet.server.services import Services, services_of

router = APIRouter(tags=["health"])

STATUS_BODY = {"application/json": {"schema": {"type": "object", "required": ["status"],
                                               "properties": {"status": {"type": "string"}}}}}  # fmt: skip
READINESS: dict[int | str, dict[str, Any]] = {
    200: {"description": "Ready: the router knows its models.", "content": STATUS_BODY},
    503: {"description": "Not ready: discovery has not listed the cluster yet, or the router is draining.",
          "content": STATUS_BODY},
}  # fmt: skip
PROMETHEUS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


@router.get("/livez")
async def livez() -> OrjsonResponse:
    return OrjsonResponse({"status": "ok"})


@router.get("/readyz", responses=READINESS)
async def readyz(request: Request) -> OrjsonResponse:
    """Ready once the router knows its models (with discovery, after the first complete listing), until it drains."""
    if request.app.state.drain.draining:
        return OrjsonResponse({"status": "draining"}, status_code=503)
    services = services_of(request)
    if services.watcher is not None and not services.watcher.synced.is_set():
        return OrjsonResponse({"status": "waiting for the first InferenceModel listing"}, status_code=503)
    return OrjsonResponse({"status": "ok", "models": len(services.registry.names())})


def reachable_now(services: Services, name: str) -> bool:
    """False only when the last probe of the model's current replicas found none answering."""
    model = services.registry.find(name)
    probe = current_probe(services, model.spec) if model is not None else None
    return probe is None or probe.get("reachable") is not False


def shows_detail(services: Services, request: Request) -> bool:
    """The detail (models, replicas and their addresses, Redis, discovery) is the admin's, when keys are
    required: an anonymous caller gets only llm-inference-server's documented fields, and no pod IP."""
    if not services.keys.required:
        return True
    try:
        services.keys.require_admin(request)
    except RouterError:
        return False
    return True


@router.get("/health")
async def health(request: Request) -> OrjsonResponse:
    services = services_of(request)
    cache = await services.cache.stats() if services.cache is not None else {"enabled": False}
    backends = {
        model.name: {"replicas": len(model.spec.endpoints), **services.reachability.get(model.name, {})}
        for model in services.registry.models()
    }
    names = services.registry.names()
    # llm-inference-server's fields: its one model (here the default model, or the only one) and
    # whether its Ollama is reachable (here that model's backends, or every model's).
    model = services.settings.default_model or (names[0] if len(names) == 1 else None)
    watched = [model] if model is not None else names
    public = {
        "status": "ok",
        "model": model,
        "ollama_reachable": all(reachable_now(services, name) for name in watched),
        "cache_stats": cache,
    }
    if not shows_detail(services, request):
        return OrjsonResponse(public)
    body = {
        **public,
        "models": names,
        "cache": cache,
        "backends": backends,
        "redis": None if services.redis_circuit is None else {"available": services.redis_circuit.available},
        "discovery": None if services.watcher is None else {"synced": services.watcher.synced.is_set(),
                                                              "healthy": services.watcher.healthy},
    }  # fmt: skip
    return OrjsonResponse(body)


@router.get("/metrics", response_class=PlainTextResponse, responses=PROMETHEUS_TEXT)
async def metrics(request: Request) -> Response:
    return Response(services_of(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
