"""When the operator may skip a server-side apply: the same manifest as last time, and an object that still matches."""

from __future__ import annotations

import copy
from typing import Any, cast

import pytest
from kubernetes import client

from modelfleet.operator.kube import Kube
from modelfleet.operator.watch_cache import WatchCache, holds

pytestmark = pytest.mark.unit

DESIRED: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "im-m", "namespace": "ai", "labels": {"app": "m"}},
    "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "ollama", "image": "ollama:1"}]}}},
}


def live(version: str, **changes: Any) -> dict[str, Any]:
    """The object as the API server holds it: defaults, status and metadata added to what was applied."""
    body = copy.deepcopy(DESIRED)
    body["metadata"].update(resourceVersion=version, uid="u1", managedFields=[])
    body["spec"]["strategy"] = {"type": "RollingUpdate"}
    body["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "IfNotPresent"
    body["status"] = {"readyReplicas": 1}
    for path, value in changes.items():
        target = body
        *parents, last = path.split("__")
        for part in parents:
            target = target[part]
        target[last] = value
    return body


class CountingKube(Kube):
    """A Kube whose requests go nowhere: each apply answers the object at a new resourceVersion."""

    def __init__(self, applied: WatchCache) -> None:
        super().__init__(cast(client.ApiClient, None), cache=applied)
        self.sent: list[str] = []

    def _call(self, method: str, resource: str, path: str, body: Any = None, *args: Any, **kwargs: Any) -> Any:
        self.sent.append(f"{method} {path}")
        return live(str(len(self.sent)))


def test_holds_compares_only_what_the_operator_sets() -> None:
    assert holds(live("7"), DESIRED)
    assert not holds(live("7", spec__replicas=2), DESIRED), "a field the operator sets was changed"
    assert not holds(live("7", metadata__labels={"app": "other"}), DESIRED)
    changed_image = live("7")
    changed_image["spec"]["template"]["spec"]["containers"][0]["image"] = "ollama:2"
    assert not holds(changed_image, DESIRED)
    extra_container = live("7")
    extra_container["spec"]["template"]["spec"]["containers"].append({"name": "sidecar"})
    assert not holds(extra_container, DESIRED), "a list is compared item by item, and its length"
    assert not holds({"kind": "Deployment"}, DESIRED)
    # The API server stores no zero values (readOnly: false comes back missing); a missing true is a change.
    assert holds({"volumeMounts": [{"name": "cache"}]}, {"volumeMounts": [{"name": "cache", "readOnly": False}]})
    assert not holds({"volumeMounts": [{"name": "cache"}]}, {"volumeMounts": [{"name": "cache", "readOnly": True}]})


def test_an_apply_is_skipped_only_when_it_would_change_nothing() -> None:
    applied = WatchCache()
    kube = CountingKube(applied)
    first = kube.apply(DESIRED)
    assert len(kube.sent) == 1, "never applied: sent"
    assert kube.apply(DESIRED) is first, "nothing changed since: skipped"
    assert len(kube.sent) == 1

    applied.observe(live("5"))  # the status changed, which the operator does not set
    assert kube.apply(DESIRED)["metadata"]["resourceVersion"] == "5", "the watch's newest object is returned"
    assert len(kube.sent) == 1

    applied.observe(live("6", spec__replicas=3))  # someone scaled it by hand: drift
    kube.apply(DESIRED)
    assert len(kube.sent) == 2, "drift: sent"

    wanted = copy.deepcopy(DESIRED)
    wanted["spec"]["replicas"] = 2
    kube.apply(wanted)
    assert len(kube.sent) == 3, "a new desired manifest: sent"

    kube.apply(DESIRED, dry_run=True)
    assert len(kube.sent) == 4, "a dry run is always sent"

    applied.observe(live("9"), deleted=True)
    kube.apply(DESIRED)
    assert len(kube.sent) == 5, "deleted: sent"


def test_without_memory_every_apply_is_sent() -> None:
    kube = CountingKube(WatchCache())
    kube.cache = None
    kube.apply(DESIRED)
    kube.apply(DESIRED)
    assert len(kube.sent) == 2


def test_a_child_already_gone_is_not_deleted_again_until_the_watch_sees_it() -> None:
    applied = WatchCache()
    kube = CountingKube(applied)
    assert kube.delete("HorizontalPodAutoscaler", "ai", "im-m") is True
    assert kube.delete("HorizontalPodAutoscaler", "ai", "im-m") is False
    assert len(kube.sent) == 1, "known to be gone: not asked again"
    assert kube.delete("PodDisruptionBudget", "ai", "im-m") is True
    assert len(kube.sent) == 2, "another child: asked"
    applied.observe({"kind": "HorizontalPodAutoscaler", "metadata": {"namespace": "ai", "name": "im-m"}})
    kube.delete("HorizontalPodAutoscaler", "ai", "im-m")
    assert len(kube.sent) == 3, "created again by someone: deleted again"


def pod(name: str, model: str, namespace: str = "ai") -> dict[str, Any]:
    labels = {"modelfleet.io/model": model, "app.kubernetes.io/component": "model-server"}
    return {"kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": labels}}


def test_a_view_from_the_watch_answers_reads_of_watched_children_without_a_request() -> None:
    applied = WatchCache()
    kube = CountingKube(applied)
    kube.watched_kinds = frozenset({"Deployment", "Pod", "PersistentVolumeClaim"})
    applied.observe(live("3"))
    for body in (pod("m-1", "m"), pod("m-2", "m"), pod("n-1", "n"), pod("m-1", "m", namespace="other")):
        applied.observe(body)
    cached = kube.from_watch()
    assert cached.get("Deployment", "ai", "im-m") == live("3")
    selector = "modelfleet.io/model=m,app.kubernetes.io/component=model-server"
    assert sorted(p["metadata"]["name"] for p in cached.list("Pod", "ai", selector)) == ["m-1", "m-2"]
    assert kube.sent == [], "answered from the watch"

    assert cached.get("PersistentVolumeClaim", "ai", "users-own-claim") is not None
    assert kube.sent == ["GET /api/v1/namespaces/ai/persistentvolumeclaims/users-own-claim"], (
        "a child the watch has not seen (a claim without the operator's label) is asked for"
    )
    cached.get("Service", "ai", "im-m")
    assert len(kube.sent) == 2, "a kind nobody watches is asked for"
    kube.get("Deployment", "ai", "im-m")
    kube.list("Pod", "ai", selector)
    assert len(kube.sent) == 4, "the client itself still asks the API server"


def test_a_deleted_pod_is_forgotten_and_a_deleted_applied_child_is_remembered_as_gone() -> None:
    applied = WatchCache()
    kube = CountingKube(applied)
    kube.watched_kinds = frozenset({"Pod"})
    applied.observe(pod("m-1", "m"))
    applied.observe(pod("m-1", "m"), deleted=True)
    assert kube.from_watch().list("Pod", "ai", "modelfleet.io/model=m") == []
    assert not applied.absent(("Pod", "ai", "m-1")), "pod names never come back: nothing kept"
    kube.apply(DESIRED)
    applied.observe(live("9"), deleted=True)
    assert applied.absent(("Deployment", "ai", "im-m"))
