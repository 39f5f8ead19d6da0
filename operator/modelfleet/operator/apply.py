"""Server-side apply of child manifests, and the reads and deletes a reconcile needs.

Every write is a server-side apply with one field manager, so the API server merges what we own
and leaves alone what others own (the HPA's replicas, defaults, other controllers' fields).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
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


class Kube:
    """A thin typed door to the API server for the operator's own kinds."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client

    def _call(
        self,
        method: str,
        path: str,
        body: bytes | str | Manifest | None = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Manifest:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
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
        kind = KINDS[manifest["kind"]]
        meta = manifest["metadata"]
        path = f"{kind.collection(meta['namespace'])}/{meta['name']}"
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        if dry_run:
            query.append(("dryRun", "All"))
        return self._call("PATCH", path, apply_body(manifest), query, "application/apply-patch+yaml")

    def get(self, kind_name: str, namespace: str, name: str) -> Manifest | None:
        kind = KINDS[kind_name]
        try:
            return self._call("GET", f"{kind.collection(namespace)}/{name}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind_name: str, namespace: str, label_selector: str) -> list[Manifest]:
        kind = KINDS[kind_name]
        result = self._call("GET", kind.collection(namespace), query=[("labelSelector", label_selector)])
        return cast(list[Manifest], result.get("items") or [])

    def delete(self, kind_name: str, namespace: str, name: str) -> bool:
        kind = KINDS[kind_name]
        try:
            self._call("DELETE", f"{kind.collection(namespace)}/{name}", body={"propagationPolicy": "Background"})
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def set_pod_condition(self, namespace: str, name: str, condition: Manifest) -> Manifest:
        """Add or replace one condition of a pod's status (a readiness gate's), leaving the kubelet's alone.

        A strategic merge patch merges status.conditions by type, so only this condition changes.
        """
        path = f"{KINDS['Pod'].collection(namespace)}/{name}/status"
        patch = {"status": {"conditions": [condition]}}
        return self._call("PATCH", path, patch, content_type="application/strategic-merge-patch+json")
