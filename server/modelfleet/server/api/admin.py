"""GET /v1/admin/models: what the router serves, where, and how loaded; admin keys only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from modelfleet.server.errors import OrjsonResponse, error_responses
from modelfleet.server.registry import ServedModel
from modelfleet.server.schemas import AdminModelList
from modelfleet.server.services import Services, services_of

router = APIRouter(tags=["admin"])


def model_state(model: ServedModel, services: Services) -> str:
    if not model.spec.endpoints:
        return "no_ready_replicas"
    probe = services.reachability.get(model.name)
    if probe is not None and not probe.get("reachable"):
        return "unreachable"
    return "ready"


def describe(model: ServedModel, services: Services) -> dict[str, Any]:
    spec, queue = model.spec, model.queue
    return {
        "name": model.name,
        "aliases": list(spec.aliases),
        "source": spec.source,
        "api": spec.api,
        "upstream_model": spec.upstream_model,
        "remote": spec.remote,
        "state": model_state(model, services),
        "replicas": len(spec.endpoints),
        "endpoints": [{"url": url, "outstanding": count} for url, count in model.outstanding.items()],
        "capacity": queue.capacity,
        "in_flight": queue.in_flight,
        "queue_depth": queue.depth,
        "max_queue": queue.max_queue,
        "max_in_flight_per_replica": spec.max_in_flight_per_replica,
        "request_timeout_seconds": spec.request_timeout_seconds,
        "cache_enabled": spec.cache_enabled,
        "requests_per_minute": spec.requests_per_minute,
        "tokens_per_minute": spec.tokens_per_minute,
        "reachability": services.reachability.get(model.name),
    }


@router.get("/v1/admin/models", responses={200: {"model": AdminModelList}, **error_responses(401, 403)})
async def admin_models(http_request: Request) -> OrjsonResponse:
    services = services_of(http_request)
    services.keys.require_admin(http_request)
    return OrjsonResponse(
        {"object": "list", "data": [describe(model, services) for model in services.registry.models()]}
    )
