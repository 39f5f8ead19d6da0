"""`create_app(settings)`: the router's FastAPI application; its lifespan owns every client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from modelfleet.server.api import health, openai
from modelfleet.server.backends.openai_compat import OpenAICompatBackend
from modelfleet.server.cache import ResponseCache
from modelfleet.server.errors import install_error_handlers
from modelfleet.server.limits import BodySizeLimit
from modelfleet.server.metrics import RouterMetrics
from modelfleet.server.queue import ModelQueue
from modelfleet.server.registry import ModelRegistry
from modelfleet.server.services import Services
from modelfleet.server.settings import RouterSettings


def create_app(settings: RouterSettings) -> FastAPI:
    metrics = RouterMetrics.create()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(settings.upstream_timeout_seconds, connect=settings.upstream_connect_timeout_seconds)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
            registry = ModelRegistry(settings.all_models())
            queues = {
                route.name: ModelQueue(route.name, route.max_in_flight, route.max_queue, metrics)
                for route in registry.routes()
            }
            app.state.services = Services(
                settings=settings,
                http=http,
                registry=registry,
                backend=OpenAICompatBackend(http),
                metrics=metrics,
                queues=queues,
                cache=ResponseCache(settings.cache_size, settings.cache_ttl_seconds) if settings.cache_size else None,
            )
            yield

    app = FastAPI(title="ModelFleet router", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(health.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
