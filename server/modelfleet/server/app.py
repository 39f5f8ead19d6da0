"""`create_app(settings)`: the router's FastAPI application; its lifespan owns every client and task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.requests import Request
from starlette.types import ASGIApp

from modelfleet.server.api import admin, compat, health, messages, openai, responses
from modelfleet.server.auth import PRINCIPAL_STATE, KeyRing
from modelfleet.server.backends.ollama import OllamaBackend
from modelfleet.server.backends.openai_compat import OpenAICompatBackend
from modelfleet.server.cache import CacheStore, MemoryStore, RedisCircuit, RedisStore, ResponseCache
from modelfleet.server.cluster_models import RouterPeers
from modelfleet.server.disconnect import CancelOnDisconnect
from modelfleet.server.discovery import ClusterWatcher
from modelfleet.server.errors import install_error_handlers
from modelfleet.server.hotpath import HotRoutes, hot_routes
from modelfleet.server.lifecycle import CloseWhenDraining, Drain
from modelfleet.server.limits import BodySizeLimit
from modelfleet.server.metrics import RouterMetrics
from modelfleet.server.probe import engine_load_forever, probe_forever
from modelfleet.server.ratelimit import MemoryRateLimiter, RedisRateLimiter
from modelfleet.server.registry import ModelRegistry
from modelfleet.server.scaling import ModelScaler
from modelfleet.server.services import Services, services_of
from modelfleet.server.settings import RouterSettings
from modelfleet.server.upstream import UpstreamClient
from modelfleet.server.workers import WorkerSlot

PROBE_INTERVAL_SECONDS = 10.0


def router_peers(settings: RouterSettings) -> RouterPeers | None:
    """Who shares each model's cap with this replica: the router Service's ready endpoints."""
    if not settings.router_service or not settings.pod_ip:
        return None
    namespace, _, service = settings.router_service.partition("/")
    return RouterPeers(namespace=namespace, service=service, address=settings.pod_ip)


class RouterApp(FastAPI):
    """FastAPI, with the router's own ASGI layers around its stack instead of inside it.

    FastAPI puts added middleware inside its error middleware and its own layers, and each of those
    wraps `send`: every streamed chunk paid for each of them. Around the stack, a generation request
    passes only the router's layers; everything else is FastAPI as usual.
    """

    def __init__(self, layers: Callable[[ASGIApp], ASGIApp], **options: Any) -> None:
        super().__init__(**options)
        self.router_layers = layers

    def build_middleware_stack(self) -> ASGIApp:
        return self.router_layers(super().build_middleware_stack())


def create_app(settings: RouterSettings, drain: Drain | None = None, worker: WorkerSlot | None = None) -> FastAPI:
    """The router app; `drain` is shared with the server that runs it (see lifecycle.py), and `worker`
    is its place among the processes on its port (workers.py)."""
    worker = worker or WorkerSlot()
    metrics = RouterMetrics.create(with_redis=settings.redis_url is not None, multiprocess=worker.count > 1)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks: list[asyncio.Task[Any]] = []

        def background(work: Coroutine[Any, Any, Any]) -> None:
            tasks.append(asyncio.create_task(work))

        # No total deadline (a stream may run for minutes); a backend silent for the timeout fails.
        # Why a client of our own rather than aiohttp or httpx: see upstream.py.
        upstream = UpstreamClient(connect_timeout=settings.upstream_connect_timeout_seconds,
                                  read_timeout=settings.upstream_timeout_seconds)  # fmt: skip
        async with contextlib.aclosing(upstream) as http:
            registry = ModelRegistry(metrics, fair_queueing=settings.queue_policy == "fair", worker=worker)
            registry.replace_source("static", [model.spec() for model in settings.all_models()])
            redis: Redis | None = None
            circuit: RedisCircuit | None = None
            limiter: MemoryRateLimiter | RedisRateLimiter = MemoryRateLimiter()
            store: CacheStore = MemoryStore(settings.cache_size)
            if settings.redis_url is not None:
                # Short timeouts: a hung Redis must cost a request milliseconds, not seconds.
                # No client-side retries either: the circuit and the failure mode decide what happens.
                redis = Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                       retry=Retry(NoBackoff(), 0))  # fmt: skip
                circuit = RedisCircuit(redis, metrics)
                limiter = RedisRateLimiter(redis, fail_open=settings.rate_limit_failure_mode == "open")
                store = RedisStore(redis, circuit)
                background(circuit.monitor())
            services = Services(
                settings=settings,
                http=http,
                registry=registry,
                backends={"openai": OpenAICompatBackend(http), "ollama": OllamaBackend(http)},
                metrics=metrics,
                cache=ResponseCache(store, settings.cache_size, settings.cache_ttl_seconds, metrics)
                if settings.cache_size
                else None,
                limiter=limiter,
                keys=KeyRing(settings.api_keys_file, settings.auth_required),
                redis=redis,
                redis_circuit=circuit,
            )
            if settings.kubernetes_discovery:
                kubeconfig = str(settings.kubeconfig) if settings.kubeconfig else None
                services.watcher = ClusterWatcher(
                    on_change=lambda specs: registry.replace_source("cluster", specs),
                    namespace=settings.kubernetes_namespace,
                    kubeconfig=kubeconfig,
                    peers=router_peers(settings),
                )
                services.scaler = ModelScaler(kubeconfig)
                background(services.watcher.run())
            background(probe_forever(services, PROBE_INTERVAL_SECONDS))
            background(engine_load_forever(services))
            if metrics.multiprocess:
                background(metrics.count_tasks_forever())
            app.state.services = services
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                await limiter.aclose()
                if services.scaler is not None:
                    await services.scaler.aclose()
                if redis is not None:
                    await redis.aclose()

    apis = (openai, responses, messages, compat, admin, health)
    routes = hot_routes(api.router for api in apis)
    app_drain = drain if drain is not None else Drain(seconds=0)

    def authenticate(request: Request) -> None:
        setattr(request.state, PRINCIPAL_STATE, services_of(request).keys.authenticate(request))

    def layers(framework: ASGIApp) -> ASGIApp:
        # Outermost first: draining, the body limit, cancellation on disconnect, then the generation
        # routes (hotpath.py); every other request goes on to FastAPI's own stack.
        inner = CancelOnDisconnect(HotRoutes(framework, routes, authenticate=authenticate))
        return CloseWhenDraining(BodySizeLimit(inner, max_bytes=settings.max_body_bytes), drain=app_drain)

    # FastAPI checks the OpenTelemetry providers on every request unless its telemetry is off.
    telemetry = None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False}
    # No redirect_slashes: its 307 names a URL built from the client's Host header.
    app = RouterApp(layers, title="ModelFleet router", version="0.1.0", lifespan=lifespan, telemetry=telemetry,
                    redirect_slashes=False)  # fmt: skip
    app.state.drain = app_drain
    install_error_handlers(app)
    for api in apis:
        app.include_router(api.router)
    return app
