"""The router's services, created by the lifespan and reached through typed accessors."""

from __future__ import annotations

from dataclasses import dataclass, field

from redis.asyncio import Redis
from starlette.requests import Request

from modelfleet.server.auth import KeyRing
from modelfleet.server.backends.base import Backend
from modelfleet.server.cache import RedisCircuit, ResponseCache
from modelfleet.server.discovery import ClusterWatcher
from modelfleet.server.metrics import RouterMetrics
from modelfleet.server.ratelimit import MemoryRateLimiter, RedisRateLimiter
from modelfleet.server.registry import ModelRegistry
from modelfleet.server.scaling import ModelScaler
from modelfleet.server.settings import RouterSettings
from modelfleet.server.upstream import UpstreamClient


@dataclass
class Services:
    settings: RouterSettings
    http: UpstreamClient
    registry: ModelRegistry
    backends: dict[str, Backend]  # by ModelSpec.api
    metrics: RouterMetrics
    cache: ResponseCache | None
    limiter: MemoryRateLimiter | RedisRateLimiter
    keys: KeyRing
    redis: Redis | None = None
    redis_circuit: RedisCircuit | None = None
    watcher: ClusterWatcher | None = None
    scaler: ModelScaler | None = None  # load and unload, with discovery
    reachability: dict[str, dict[str, object]] = field(default_factory=dict)  # model -> last probe result


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services
