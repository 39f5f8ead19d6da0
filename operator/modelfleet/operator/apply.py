"""Server-side apply of child manifests, and the reads and deletes a reconcile needs.

Every write is a server-side apply with one field manager, so the API server merges what we own
and leaves alone what others own (the HPA's replicas, defaults, other controllers' fields).
An apply that would change nothing is not sent at all (`AppliedChildren`), and a periodic resync
reads the children from what the watch has seen rather than from the API server (`Kube.from_watch`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

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


ChildKey = tuple[str, str, str]  # (kind, namespace, name)


def manifest_digest(manifest: Manifest) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def holds(live: Any, desired: Any) -> bool:
    """Whether every field of `desired` is in `live` with the same value (lists item by item).

    Fields only `live` has (defaults, status, other managers' fields) do not matter: an apply would
    leave them as they are.  A field missing from `live` holds a zero value (false, 0, "", empty):
    the API server leaves zero values out of what it stores (Go's omitempty).
    """
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(
            holds(live[key], value) if key in live else not value for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (isinstance(live, list) and len(live) == len(desired)
                and all(holds(item, wanted) for item, wanted in zip(live, desired, strict=True)))  # fmt: skip
    return bool(live == desired)


@dataclass
class AppliedChildren:
    """What the operator last applied to each child, and the newest version of it that the watch has seen.

    An apply is skipped when the desired manifest is the one applied last time and the object still
    matches it: either nothing changed it since (the watch's newest resourceVersion is the one that
    apply returned), or only fields the operator does not set changed (status, most often).  The API
    server would merge such an apply into the same object.  Any doubt (an unknown child, an event not
    seen yet, an operator restart, a value the API server stores in another form) sends the apply.
    Drift still comes back within a second: the change that causes it is a watch event, which both
    shows the difference and triggers the reconcile.
    """

    _applied: dict[ChildKey, tuple[str, str]] = field(default_factory=dict)  # digest, resourceVersion
    _seen: dict[ChildKey, Manifest] = field(default_factory=dict)
    # Children deleted (or found missing) by the operator, and not seen again since: deleting them
    # again would only earn a 404.
    _absent: set[ChildKey] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def key(body: Manifest) -> ChildKey:
        meta = body.get("metadata") or {}
        return (str(body.get("kind", "")), str(meta.get("namespace", "")), str(meta.get("name", "")))

    def observe(self, body: Manifest, deleted: bool = False) -> None:
        """A watch event of a child."""
        key = self.key(body)
        with self._lock:
            if deleted:
                self._seen.pop(key, None)
                # Only what the operator applies comes back under the same name; a pod's name never
                # does, and remembering every deleted pod would grow without end.
                if self._applied.pop(key, None) is not None:
                    self._absent.add(key)
            else:
                self._seen[key] = body
                self._absent.discard(key)

    def seen(self, kind: str, namespace: str, name: str) -> Manifest | None:
        with self._lock:
            return self._seen.get((kind, namespace, name))

    def seen_matching(self, kind: str, namespace: str, labels: dict[str, str]) -> list[Manifest]:
        with self._lock:
            candidates = [body for (k, ns, _), body in self._seen.items() if k == kind and ns == namespace]
        return [
            body
            for body in candidates
            if all(
                ((body.get("metadata") or {}).get("labels") or {}).get(key) == value for key, value in labels.items()
            )
        ]

    def absent(self, key: ChildKey) -> bool:
        with self._lock:
            return key in self._absent

    def gone(self, key: ChildKey) -> None:
        """The operator deleted the child, or the API server said it does not exist."""
        with self._lock:
            self._seen.pop(key, None)
            self._applied.pop(key, None)
            self._absent.add(key)

    def unchanged(self, manifest: Manifest) -> Manifest | None:
        """The live object, if applying `manifest` now would change nothing; else None."""
        key = self.key(manifest)
        with self._lock:
            applied, seen = self._applied.get(key), self._seen.get(key)
        if applied is None or seen is None:
            return None
        digest, applied_version = applied
        if digest != manifest_digest(manifest):
            return None
        if (seen.get("metadata") or {}).get("resourceVersion") == applied_version or holds(seen, manifest):
            return seen
        return None

    def record(self, manifest: Manifest, live: Manifest) -> None:
        """An apply of `manifest` returned `live`."""
        key = self.key(manifest)
        version = str((live.get("metadata") or {}).get("resourceVersion", ""))
        with self._lock:
            self._applied[key] = (manifest_digest(manifest), version)
            self._seen[key] = live
            self._absent.discard(key)


def count_nothing(verb: str, resource: str) -> None:
    """The default counter of requests and of skipped applies."""


class Kube:
    """A thin typed door to the API server for the operator's own kinds."""

    def __init__(
        self,
        api_client: client.ApiClient,
        count_request: Callable[[str, str], None] = count_nothing,
        applied: AppliedChildren | None = None,
        count_skipped: Callable[[str, str], None] = count_nothing,
        watched_kinds: frozenset[str] = frozenset(),
    ) -> None:
        self.api_client = api_client
        self.count_request = count_request
        self.count_skipped = count_skipped
        # None: every apply is sent (tests that count applies, one-off tools).
        self.applied = applied
        # The kinds whose children (by the managed-by label) the watch brings to `applied`; reads of
        # them come from there in a `from_watch` view.
        self.watched_kinds = watched_kinds
        self.reads_from_watch = False

    def from_watch(self) -> Kube:
        """This client, reading watched children from what the watch has seen (as controller-runtime's
        informer caches do). A child the watch has not seen is still asked for; a listing is not."""
        view = copy.copy(self)
        view.reads_from_watch = self.applied is not None
        return view

    def _watched(self, kind_name: str) -> AppliedChildren | None:
        if self.reads_from_watch and kind_name in self.watched_kinds:
            return self.applied
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
        if self.applied is not None and not dry_run:
            live = self.applied.unchanged(manifest)
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
        if self.applied is not None and not dry_run:
            self.applied.record(manifest, live)
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
        if self.applied is not None and self.applied.absent(key):
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
        if self.applied is not None:
            self.applied.gone(key)
        return existed

    def set_pod_condition(self, namespace: str, name: str, condition: Manifest) -> Manifest:
        """Add or replace one condition of a pod's status (a readiness gate's), leaving the kubelet's alone.

        A strategic merge patch merges status.conditions by type, so only this condition changes.
        """
        path = f"{KINDS['Pod'].collection(namespace)}/{name}/status"
        patch = {"status": {"conditions": [condition]}}
        return self._call("PATCH", "pods/status", path, patch, content_type="application/strategic-merge-patch+json")
