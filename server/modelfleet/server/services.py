"""The router's services, created by the lifespan and reached through typed accessors."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from starlette.requests import Request

from modelfleet.server.backends.openai_compat import OpenAICompatBackend
from modelfleet.server.cache import ResponseCache
from modelfleet.server.metrics import RouterMetrics
from modelfleet.server.queue import ModelQueue
from modelfleet.server.registry import ModelRegistry
from modelfleet.server.settings import RouterSettings


@dataclass
class Services:
    settings: RouterSettings
    http: httpx.AsyncClient
    registry: ModelRegistry
    backend: OpenAICompatBackend
    metrics: RouterMetrics
    queues: dict[str, ModelQueue]
    cache: ResponseCache | None


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services
