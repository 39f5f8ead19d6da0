"""`python -m modelfleet.server`: serve the router with uvicorn (uvloop, httptools)."""

from __future__ import annotations

import gc
import logging
import os
import sys

import uvicorn
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from modelfleet.server.app import create_app
from modelfleet.server.http_limits import ConnectionLimits, limited_protocol
from modelfleet.server.lifecycle import Drain, DrainingServer
from modelfleet.server.settings import RouterSettings
from modelfleet.server.workers import WORKER_INDEX_ENV, Supervisor, check_limits, reuse_port_socket, this_worker


class ListenSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELFLEET_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 in a pod).")
    port: int = Field(8000, description="Port to listen on.")
    access_log: bool = Field(False, description="Log every request (costs CPU per request; metrics count them).")
    shutdown_drain_seconds: float = Field(
        5.0,
        ge=0,
        description="After SIGTERM, keep serving this long with /readyz failing, so load balancers "
        "stop sending before the listener closes (0: close at once).",
    )
    shutdown_grace_seconds: int = Field(
        30,
        ge=0,
        description="Then wait this long for in-flight requests and streams; longer ones are cancelled. "
        "The pod's terminationGracePeriodSeconds must exceed drain + grace.",
    )
    workers: int = Field(
        1,
        ge=1,
        description="Router processes sharing the port (SO_REUSEPORT), one core each; above 1, rate limits "
        "need MODELFLEET_REDIS_URL (see docs/benchmarks.md).",
    )


# Python's cyclic garbage collector runs a young-generation pass every 700 net container allocations,
# and each proxied request allocates hundreds (dicts, coroutines, futures), so it ran every few
# requests, and each older-generation pass walked every object of the imported libraries. The
# router's work is request-scoped and mostly acyclic (reference counting frees it), so: collect
# rarely, and move what exists at startup out of the collector's sight. Measured in
# docs/benchmarks.md (CPU per proxied request, A/B in one run).
GC_THRESHOLDS = (20_000, 50, 100)


def tune_garbage_collection() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main() -> None:
    listen = ListenSettings()
    # httpx (discovery's client) logs every request at INFO: noise, and URLs do not belong in logs.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = RouterSettings()
    if refusal := check_limits(settings, listen.workers):
        sys.exit(f"error: {refusal}")
    worker = this_worker(listen.workers)
    if listen.workers > 1 and os.environ.get(WORKER_INDEX_ENV) is None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
        sys.exit(Supervisor(listen.workers).run())
    drain = Drain(seconds=listen.shutdown_drain_seconds)
    config = uvicorn.Config(
        create_app(settings, drain, worker),
        host=listen.host,
        port=listen.port,
        loop="uvloop",
        # httptools with a cap on connections, header bytes and header time (http_limits.py); every
        # worker process runs this same main(), so each gets them.
        http=limited_protocol(
            ConnectionLimits(settings.max_header_bytes, settings.header_timeout_seconds, settings.max_connections)
        ),
        timeout_graceful_shutdown=listen.shutdown_grace_seconds,
        log_level="info",
        access_log=listen.access_log,
    )
    # A worker binds its own listener with SO_REUSEPORT; a single process lets uvicorn bind.
    sockets = [reuse_port_socket(listen.host, listen.port)] if worker.count > 1 else None
    tune_garbage_collection()
    DrainingServer(config, drain).run(sockets=sockets)


if __name__ == "__main__":
    main()
