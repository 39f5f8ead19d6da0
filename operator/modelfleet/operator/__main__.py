"""`python -m modelfleet.operator`: run the operator (Kopf) with settings from MODELFLEET_OPERATOR_*."""

from __future__ import annotations

from typing import cast

import kopf
from kubernetes import client, config
from prometheus_client import start_http_server

from modelfleet.operator import handlers
from modelfleet.operator.controller import Controller, ReconcileMetrics
from modelfleet.operator.kube import Kube
from modelfleet.operator.settings import OperatorSettings
from modelfleet.operator.warmup import WarmUps
from modelfleet.operator.watch_cache import WatchCache


def load_api_client() -> client.ApiClient:
    """In a pod: the ServiceAccount; elsewhere: $KUBECONFIG or ~/.kube/config."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()
    except config.ConfigException:
        return cast(client.ApiClient, config.new_client_from_config())  # type: ignore[no-untyped-call]


def main() -> None:
    # Kopf's own formatter, with each object's namespace/name before its messages: without it a
    # line such as "Handler 'create' succeeded." does not say which model it is about.
    kopf.configure(log_format=kopf.LogFormat.FULL, log_prefix=True)
    settings = OperatorSettings()
    api_client = load_api_client()
    metrics = ReconcileMetrics.create()
    kube = Kube(api_client, count_request=metrics.count_request, cache=WatchCache(),
                count_skipped=metrics.count_skipped, watched_kinds=handlers.WATCHED_KINDS)  # fmt: skip
    controller = Controller(
        settings=settings,
        kube=kube,
        metrics=metrics,
        warmups=WarmUps(
            set_condition=kube.set_pod_condition,
            timeout_seconds=settings.warmup_timeout_seconds,
            workers=settings.warmup_workers,
        ),
    )
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=controller.metrics.registry)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, settings)
    kopf_settings = kopf.OperatorSettings()
    handlers.configure(kopf_settings, settings)
    try:
        kopf.run(
            registry=registry,
            settings=kopf_settings,
            memo=kopf.Memo(controller=controller),
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=f"http://{settings.liveness_host}:{settings.liveness_port}/healthz",
        )
    finally:
        controller.warmups.shutdown()


if __name__ == "__main__":
    main()
