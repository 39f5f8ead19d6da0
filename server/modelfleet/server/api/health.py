"""Health endpoints: fast, and they never call a model."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import ORJSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelfleet.server.services import services_of

router = APIRouter()


@router.get("/livez")
async def livez() -> ORJSONResponse:
    return ORJSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> ORJSONResponse:
    return ORJSONResponse({"status": "ok", "models": len(services_of(request).registry.names())})


@router.get("/health")
async def health(request: Request) -> ORJSONResponse:
    services = services_of(request)
    cache = services.cache.stats() if services.cache is not None else {"enabled": False}
    return ORJSONResponse({"status": "ok", "models": services.registry.names(), "cache": cache})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(services_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
