"""Kopf handlers.  Each one is thin: it names which model to sync and hands over to the `Controller`
(controller.py); and Kopf's settings and registration.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import kopf

from modelfleet.api import v1alpha1
from modelfleet.api.naming import FINALIZER, MANAGED_BY, MANAGED_BY_LABEL, MODEL_LABEL
from modelfleet.operator.controller import Controller
from modelfleet.operator.kube import KINDS
from modelfleet.operator.settings import OperatorSettings

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


def controller_of(memo: Any) -> Controller:
    controller: Controller = memo.controller
    return controller


def on_model_changed(name: str, namespace: str, memo: Any, logger: logging.Logger, **_: Any) -> None:
    controller_of(memo).sync(namespace, name, "model", logger)


def on_resync(name: str, namespace: str, body: kopf.Body, memo: Any, logger: logging.Logger, **_: Any) -> None:
    # Copied: Kopf's body is a live view of its own.
    controller_of(memo).sync(namespace, name, "resync", logger, seen=copy.deepcopy(dict(body)))


def on_child_event(
    body: dict[str, Any], namespace: str, memo: Any, logger: logging.Logger, type: str | None = None, **_: Any
) -> None:
    cache = controller_of(memo).kube.cache
    if cache is not None:
        # Copied: Kopf's body is a view of its own, and the sync reads this one later.
        cache.observe(copy.deepcopy(dict(body)), deleted=type == "DELETED")
    model = (body.get("metadata", {}).get("labels") or {}).get(MODEL_LABEL)
    if model and type is not None:  # type None is the initial listing; resume handlers cover it
        controller_of(memo).sync(namespace, model, "child", logger)


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
