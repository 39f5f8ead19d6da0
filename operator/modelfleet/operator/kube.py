"""The operator's one Kubernetes client beside Kopf's: server-side apply of child manifests, the reads and
deletes a reconcile needs, and an InferenceModel's read and status.

Every write is a server-side apply with one field manager, so the API server merges what we own
and leaves alone what others own (the HPA's replicas, defaults, other controllers' fields).
An apply that would change nothing is not sent at all (`WatchCache`), and a periodic resync
reads the children from what the watch has seen rather than from the API server (`Kube.from_watch`).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modelfleet.api import v1alpha1
from modelfleet.api.naming import collection_path
from modelfleet.operator.watch_cache import WatchCache

Manifest = dict[str, Any]

FIELD_MANAGER = "modelfleet-operator"


@dataclass(frozen=True)
class KindPath:
    group: str  # "" for the core group
    version: str
    plural: str

    def collection(self, namespace: str) -> str:
        prefix = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        return f"{prefix}/namespaces/{namespace}/{self.plural}"


KINDS: dict[str, KindPath] = {
    "Deployment": KindPath("apps", "v1", "deployments"),
    "Service": KindPath("", "v1", "services"),
    "PersistentVolumeClaim": KindPath("", "v1", "persistentvolumeclaims"),
    "Job": KindPath("batch", "v1", "jobs"),
    "HorizontalPodAutoscaler": KindPath("autoscaling", "v2", "horizontalpodautoscalers"),
    "PodDisruptionBudget": KindPath("policy", "v1", "poddisruptionbudgets"),
    "Pod": KindPath("", "v1", "pods"),
    "NetworkPolicy": KindPath("networking.k8s.io", "v1", "networkpolicies"),
}


# Characters YAML may refuse raw or read as line breaks (DEL, C1 controls with NEL, the line and
# paragraph separators, BOM, non-characters, lone surrogates); it reads them right when escaped.
# JSON escapes the C0 controls itself.
YAML_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ud800-\udfff\ufffe\uffff]")


def apply_body(manifest: Manifest) -> bytes:
    """The manifest as an apply patch, which the API server reads as YAML (JSON is YAML).

    YAML refuses JSON's surrogate-pair escapes (\\ud83e\\udd99), so characters beyond the BMP (an
    emoji in a model name) are sent as UTF-8, and only those YAML cannot hold raw are escaped.
    """
    text = json.dumps(manifest, ensure_ascii=False)
    return YAML_UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text).encode()


def count_nothing(verb: str, resource: str) -> None:
    """The default counter of requests and of skipped applies."""


class Kube:
    """A thin typed door to the API server for the operator's own kinds."""

    def __init__(
        self,
        api_client: client.ApiClient,
        count_request: Callable[[str, str], None] = count_nothing,
        cache: WatchCache | None = None,
        count_skipped: Callable[[str, str], None] = count_nothing,
        watched_kinds: frozenset[str] = frozenset(),
    ) -> None:
        self.api_client = api_client
        self.count_request = count_request
        self.count_skipped = count_skipped
        # None: every apply is sent (tests that count applies, one-off tools).
        self.cache = cache
        # The kinds whose children (by the managed-by label) the watch brings to `cache`; reads of
        # them come from there in a `from_watch` view.
        self.watched_kinds = watched_kinds
        self.reads_from_watch = False

    def from_watch(self) -> Kube:
        """This client, reading watched children from what the watch has seen (as controller-runtime's
        informer caches do). A child the watch has not seen is still asked for; a listing is not."""
        view = copy.copy(self)
        view.reads_from_watch = self.cache is not None
        return view

    def _watched(self, kind_name: str) -> WatchCache | None:
        if self.reads_from_watch and kind_name in self.watched_kinds:
            return self.cache
        return None

    def _call(
        self,
        method: str,
        resource: str,
        path: str,
        body: bytes | str | Manifest | None = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        verb: str | None = None,
    ) -> Manifest:
        """One request; `verb` is what it counts as (Kubernetes' verbs: get, list, patch, delete)."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        self.count_request(verb or method.lower(), resource)
        request = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*request)
        response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response)
        return cast(Manifest, json.loads(response.data or b"{}"))

    def apply(self, manifest: Manifest, dry_run: bool = False) -> Manifest:
        """The object after a server-side apply of `manifest`; not sent if it would change nothing."""
        if self.cache is not None and not dry_run:
            live = self.cache.unchanged(manifest)
            if live is not None:
                self.count_skipped("patch", KINDS[manifest["kind"]].plural)
                return live
        kind = KINDS[manifest["kind"]]
        meta = manifest["metadata"]
        path = f"{kind.collection(meta['namespace'])}/{meta['name']}"
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        if dry_run:
            query.append(("dryRun", "All"))
        live = self._call("PATCH", kind.plural, path, apply_body(manifest), query, "application/apply-patch+yaml")
        if self.cache is not None and not dry_run:
            self.cache.record(manifest, live)
        return live

    def get(self, kind_name: str, namespace: str, name: str) -> Manifest | None:
        kind = KINDS[kind_name]
        watched = self._watched(kind_name)
        if watched is not None:
            body = watched.seen(kind_name, namespace, name)
            if body is not None:
                self.count_skipped("get", kind.plural)
                return body
        try:
            return self._call("GET", kind.plural, f"{kind.collection(namespace)}/{name}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind_name: str, namespace: str, label_selector: str) -> list[Manifest]:
        """The objects matching an equality selector (`key=value,...`, the only kind the operator uses)."""
        kind = KINDS[kind_name]
        watched = self._watched(kind_name)
        if watched is not None:
            self.count_skipped("list", kind.plural)
            return watched.seen_matching(
                kind_name, namespace, dict(term.split("=", 1) for term in label_selector.split(","))
            )
        result = self._call("GET", kind.plural, kind.collection(namespace), query=[("labelSelector", label_selector)],
                            verb="list")  # fmt: skip
        return cast(list[Manifest], result.get("items") or [])

    def delete(self, kind_name: str, namespace: str, name: str) -> bool:
        """Delete the object; False if it did not exist (not asked again while the watch has not seen it)."""
        kind = KINDS[kind_name]
        key = (kind_name, namespace, name)
        if self.cache is not None and self.cache.absent(key):
            self.count_skipped("delete", kind.plural)
            return False
        try:
            self._call("DELETE", kind.plural, f"{kind.collection(namespace)}/{name}",
                       body={"propagationPolicy": "Background"})  # fmt: skip
        except ApiException as exc:
            if exc.status != 404:
                raise
            existed = False
        else:
            existed = True
        if self.cache is not None:
            self.cache.gone(key)
        return existed

    def set_pod_condition(self, namespace: str, name: str, condition: Manifest) -> Manifest:
        """Add or replace one condition of a pod's status (a readiness gate's), leaving the kubelet's alone.

        A strategic merge patch merges status.conditions by type, so only this condition changes.
        """
        path = f"{KINDS['Pod'].collection(namespace)}/{name}/status"
        patch = {"status": {"conditions": [condition]}}
        return self._call("PATCH", "pods/status", path, patch, content_type="application/strategic-merge-patch+json")

    def get_model(self, namespace: str, name: str) -> Manifest | None:
        """An InferenceModel, read afresh (a resync reads Kopf's copy instead)."""
        try:
            return self._call("GET", v1alpha1.PLURAL, f"{collection_path(namespace)}/{name}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_model_status(self, namespace: str, name: str, status: Manifest) -> Manifest:
        path = f"{collection_path(namespace)}/{name}/status"
        return self._call("PATCH", f"{v1alpha1.PLURAL}/status", path, {"status": status},
                          content_type="application/merge-patch+json")  # fmt: skip
