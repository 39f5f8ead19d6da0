"""The operator's engine, in the terms controller-runtime uses: a work queue of models, one `sync` per model
(a level-based reconcile of it: reconcile.py), one client of ours (kube.py) and the watch cache behind it
(watch_cache.py). Kopf's handlers (handlers.py) only say which model to sync.

Every path (the model changed, a child changed, the periodic resync) runs the same sync, coalesced so that
a burst of child events costs one extra pass at most.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Counter, Histogram

from modelfleet.api.conditions import ConditionType
from modelfleet.operator.kube import Kube
from modelfleet.operator.reconcile import namespace_terminating, reconcile, status_changed
from modelfleet.operator.settings import OperatorSettings
from modelfleet.operator.warmup import WarmUps

ModelKey = tuple[str, str]  # (namespace, name)


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
class WorkQueue:
    """Which models are being synced, and which must be synced again when that ends (client-go's workqueue,
    without its own workers: Kopf's handler threads are the workers). A key is synced by one worker at a
    time, and a burst of events during a sync costs one more sync, not one each."""

    _guard: threading.Lock = field(default_factory=threading.Lock)
    _processing: set[ModelKey] = field(default_factory=set)
    _dirty: set[ModelKey] = field(default_factory=set)

    def start(self, key: ModelKey) -> bool:
        """True if the caller is to sync `key` now; False if another worker is at it (and will sync again)."""
        with self._guard:
            if key in self._processing:
                self._dirty.add(key)
                return False
            self._processing.add(key)
            return True

    def done(self, key: ModelKey) -> bool:
        """The sync of `key` ended; True if it was marked dirty meanwhile and is to be synced again."""
        with self._guard:
            if key in self._dirty:
                self._dirty.discard(key)
                return True
            self._processing.discard(key)
            return False

    def forget(self, key: ModelKey) -> None:
        """The sync failed: Kopf retries the handler, so nothing is left pending here."""
        with self._guard:
            self._processing.discard(key)
            self._dirty.discard(key)


@dataclass
class Controller:
    """The operator's engine: one sync per model, driven by Kopf's handlers through its memo, with one
    client of ours (`kube`), the watch cache behind it, and the warm-ups."""

    settings: OperatorSettings
    kube: Kube
    metrics: ReconcileMetrics
    warmups: WarmUps
    queue: WorkQueue = field(default_factory=WorkQueue)
    started: float = field(default_factory=time.monotonic)

    def watch_is_warm(self) -> bool:
        """Whether the watches have had a resync interval to list every child. Until then (at start-up,
        when the first resync of each model runs at once), a resync reads from the API server."""
        return time.monotonic() - self.started >= self.settings.resync_seconds

    def sync(
        self, namespace: str, name: str, trigger: str, logger: logging.Logger | Any, seen: dict[str, Any] | None = None
    ) -> None:
        """Sync the model now, or, if a sync of it is running, once more right after that one.

        `seen`: the model as Kopf's watch last saw it, given by the resync. With it, and once the
        watches are warm, the sync sends no reads at all: a steady state costs the API server
        nothing. Event-driven syncs read the model and its children afresh."""
        key = (namespace, name)
        if not self.queue.start(key):
            return
        try:
            while True:
                self._sync_once(namespace, name, trigger, logger, seen)
                if not self.queue.done(key):
                    return
                trigger, seen = "coalesced", None
        except BaseException:
            self.queue.forget(key)
            raise

    def _sync_once(
        self, namespace: str, name: str, trigger: str, logger: logging.Logger | Any, seen: dict[str, Any] | None
    ) -> None:
        kube = self.kube
        body: dict[str, Any] | None
        if seen is not None and self.watch_is_warm():
            body, kube = seen, kube.from_watch()
        else:
            body = self.kube.get_model(namespace, name)
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
            self.kube.patch_model_status(namespace, name, outcome.status)
        for change in outcome.transitions:
            healthy = (change.type == ConditionType.DEGRADED) == (change.status == "False")
            kopf.event(
                kopf.Body(cast(kopf.RawBody, body)),
                type="Normal" if healthy else "Warning",
                reason=change.reason,
                message=f"{change.type}={change.status}: {change.message}",
            )
            logger.info(
                "%s/%s %s=%s (%s): %s", namespace, name, change.type, change.status, change.reason, change.message
            )
