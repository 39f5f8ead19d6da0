"""Kopf handlers.  Each one is thin: it names which model to reconcile and hands over to `Runtime`.

Every path (the model changed, a child changed, the periodic resync) runs the same level-based
reconcile of one model, coalesced so that a burst of child events costs one extra pass at most.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Counter, Histogram

from modelfleet.api import v1alpha1
from modelfleet.api.naming import FINALIZER, MANAGED_BY, MANAGED_BY_LABEL, MODEL_LABEL
from modelfleet.operator.apply import KINDS, Kube
from modelfleet.operator.reconcile import namespace_terminating, reconcile, status_changed
from modelfleet.operator.settings import OperatorSettings
from modelfleet.operator.warmup import WarmUps

CHILD_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
# (group, version, plural) of every kind whose changes can change a model's desired or observed state.
CHILD_RESOURCES = [
    ("apps", "v1", "deployments"),
    ("batch", "v1", "jobs"),
    ("", "v1", "pods"),
    ("", "v1", "services"),
    ("", "v1", "persistentvolumeclaims"),
    ("autoscaling", "v2", "horizontalpodautoscalers"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("networking.k8s.io", "v1", "networkpolicies"),
]
# Their kinds: the watch keeps the newest of each child, which a resync reads instead of the API server.
WATCHED_KINDS = frozenset(
    kind for kind, path in KINDS.items() if (path.group, path.version, path.plural) in CHILD_RESOURCES
)


@dataclass
class ReconcileMetrics:
    registry: CollectorRegistry
    total: Counter
    duration: Histogram
    errors: Counter
    api_requests: Counter
    skipped_requests: Counter

    @classmethod
    def create(cls) -> ReconcileMetrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            total=Counter("modelfleet_operator_reconciles_total", "Reconciles run", ["trigger"], registry=registry),
            duration=Histogram(
                "modelfleet_operator_reconcile_duration_seconds", "Duration of one reconcile", registry=registry
            ),
            errors=Counter("modelfleet_operator_reconcile_errors_total", "Reconciles that failed", registry=registry),
            api_requests=Counter(
                "modelfleet_operator_api_requests_total",
                "Requests of reconciles to the API server (Kopf's own watches are not counted)",
                ["verb", "resource"],
                registry=registry,
            ),
            skipped_requests=Counter(
                "modelfleet_operator_skipped_requests_total",
                "Requests not sent: applies that would have changed nothing, deletes of children already "
                "gone, and a resync's reads, answered from what the watches have seen",
                ["verb", "resource"],
                registry=registry,
            ),
        )

    def count_skipped(self, verb: str, resource: str) -> None:
        self.skipped_requests.labels(verb=verb, resource=resource).inc()

    def count_request(self, verb: str, resource: str) -> None:
        self.api_requests.labels(verb=verb, resource=resource).inc()


@dataclass
class Runtime:
    """The operator's clients and state, created at start-up and passed to handlers through kopf's memo."""

    settings: OperatorSettings
    kube: Kube
    custom: client.CustomObjectsApi
    metrics: ReconcileMetrics
    warmups: WarmUps
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _running: set[tuple[str, str]] = field(default_factory=set)
    _pending: set[tuple[str, str]] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)

    def watch_is_warm(self) -> bool:
        """Whether the watches have had a resync interval to list every child. Until then (at start-up,
        when the first resync of each model runs at once), a resync reads from the API server."""
        return time.monotonic() - self.started >= self.settings.resync_seconds

    def read_model(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.metrics.count_request("get", v1alpha1.PLURAL)
        try:
            body = cast(
                dict[str, Any],
                self.custom.get_namespaced_custom_object(
                    v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, name
                ),
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return body

    def reconcile_model(
        self, namespace: str, name: str, trigger: str, logger: logging.Logger | Any, seen: dict[str, Any] | None = None
    ) -> None:
        """Reconcile now, or, if a reconcile of this model is running, once more right after it.

        `seen`: the model as Kopf's watch last saw it, given by the resync. With it, and once the
        watches are warm, the reconcile sends no reads at all: a steady state costs the API server
        nothing. Event-driven reconciles read the model and its children afresh."""
        key = (namespace, name)
        with self._guard:
            if key in self._running:
                self._pending.add(key)
                return
            self._running.add(key)
        try:
            while True:
                self._reconcile_once(namespace, name, trigger, logger, seen)
                with self._guard:
                    if key not in self._pending:
                        self._running.discard(key)
                        return
                    self._pending.discard(key)
                trigger, seen = "coalesced", None
        except BaseException:
            with self._guard:
                self._running.discard(key)
                self._pending.discard(key)
            raise

    def _reconcile_once(
        self, namespace: str, name: str, trigger: str, logger: logging.Logger | Any, seen: dict[str, Any] | None
    ) -> None:
        kube = self.kube
        body: dict[str, Any] | None
        if seen is not None and self.watch_is_warm():
            body, kube = seen, kube.from_watch()
        else:
            body = self.read_model(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # owner references let the garbage collector remove the children
        self.metrics.total.labels(trigger=trigger).inc()
        started = time.monotonic()
        try:
            outcome = reconcile(
                kube,
                body,
                self.settings.images,
                self.settings.endpoint_probe_timeout_seconds,
                self.settings.network_peers,
            )
        except ApiException as exc:
            if namespace_terminating(exc):
                # The garbage collector removes the model with its namespace; retrying would only log.
                logger.debug("%s/%s: its namespace is being deleted", namespace, name)
                return
            self.metrics.errors.inc()
            raise
        except Exception:
            self.metrics.errors.inc()
            raise
        finally:
            self.metrics.duration.observe(time.monotonic() - started)
        if outcome.warmup is not None:
            # In the background: a pod's condition change brings the model back here when it is done.
            self.warmups.ensure(outcome.warmup.pods, outcome.warmup.runtime, outcome.warmup.port)
        if status_changed(body.get("status") or {}, outcome.status):
            self.metrics.count_request("patch", f"{v1alpha1.PLURAL}/status")
            self.custom.patch_namespaced_custom_object_status(
                v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, name, {"status": outcome.status}
            )
        for change in outcome.transitions:
            healthy = (change.type == "Degraded") == (change.status == "False")
            kopf.event(
                kopf.Body(cast(kopf.RawBody, body)),
                type="Normal" if healthy else "Warning",
                reason=change.reason,
                message=f"{change.type}={change.status}: {change.message}",
            )
            logger.info(
                "%s/%s %s=%s (%s): %s", namespace, name, change.type, change.status, change.reason, change.message
            )


def runtime_of(memo: Any) -> Runtime:
    runtime: Runtime = memo.runtime
    return runtime


def on_model_changed(name: str, namespace: str, memo: Any, logger: logging.Logger, **_: Any) -> None:
    runtime_of(memo).reconcile_model(namespace, name, "model", logger)


def on_resync(name: str, namespace: str, body: kopf.Body, memo: Any, logger: logging.Logger, **_: Any) -> None:
    # Copied: Kopf's body is a live view of its own.
    runtime_of(memo).reconcile_model(namespace, name, "resync", logger, seen=copy.deepcopy(dict(body)))


def on_child_event(
    body: dict[str, Any], namespace: str, memo: Any, logger: logging.Logger, type: str | None = None, **_: Any
) -> None:
    applied = runtime_of(memo).kube.applied
    if applied is not None:
        # Copied: Kopf's body is a view of its own, and the reconcile reads this one later.
        applied.observe(copy.deepcopy(dict(body)), deleted=type == "DELETED")
    model = (body.get("metadata", {}).get("labels") or {}).get(MODEL_LABEL)
    if model and type is not None:  # type None is the initial listing; resume handlers cover it
        runtime_of(memo).reconcile_model(namespace, model, "child", logger)


def configure(settings: kopf.OperatorSettings, operator: OperatorSettings) -> None:
    """Explicit Kopf settings: every key Kopf writes on our objects lives under modelfleet.io."""
    # Peering lets several replicas run for availability: the highest priority one works, the
    # others stand by.  It needs the KopfPeering CRDs (shipped with the chart); standalone skips it.
    settings.peering.standalone = operator.standalone
    settings.peering.mandatory = not operator.standalone
    settings.peering.name = operator.peering_name
    settings.peering.priority = operator.peering_priority()
    settings.peering.clusterwide = not operator.namespaces
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="modelfleet.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="modelfleet.io", key="last-handled-configuration"
    )
    # Events for warnings and errors only. At INFO, Kopf posted two Events per handled change
    # ("Handler 'create' succeeded.", "Creation is processed: ...") and one more for each transition the
    # handler logged, which the reconcile already posts as an Event with its own reason: three writes
    # per new model that told the user nothing new, while 200 new models wait on the API server.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # The children are watched by label on the API server's side: a client-side filter (the handlers'
    # `labels=`) would still stream every pod, Job and Service of the cluster to the operator.
    for group, version, plural in CHILD_RESOURCES:
        settings.watching.label_selectors[(f"{group}/{version}" if group else version, plural)] = CHILD_SELECTOR
    settings.execution.max_workers = operator.reconcile_workers


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    """Register the handlers.  No deletion handler: the garbage collector removes a model's
    children through their owner references.  Kopf still puts its finalizer on every model,
    because the resync timer needs one to stop cleanly: delete models before the operator."""
    # Same credentials as our own client: the in-cluster ServiceAccount, or $KUBECONFIG.
    kopf.on.login(id="login", registry=registry)(kopf.login_via_client)
    resource = (v1alpha1.GROUP, v1alpha1.VERSION, v1alpha1.PLURAL)
    decorators: list[Callable[[Any], Any]] = [
        kopf.on.resume(*resource, id="resume", registry=registry),
        kopf.on.create(*resource, id="create", registry=registry),
        kopf.on.update(*resource, id="update", field="spec", registry=registry),
    ]
    for decorate in decorators:
        decorate(on_model_changed)
    # Kopf's handler protocols list every keyword it may pass; ours take the few they use and **_.
    kopf.timer(*resource, id="resync", interval=settings.resync_seconds, sharp=False, registry=registry)(
        on_resync  # type: ignore[arg-type]
    )
    for group, version, plural in CHILD_RESOURCES:
        api_version = f"{group}/{version}" if group else version
        kopf.on.event(
            api_version, plural, id=f"child-{plural}", labels={MANAGED_BY_LABEL: MANAGED_BY},
            registry=registry,
        )(on_child_event)  # type: ignore[arg-type]  # fmt: skip
