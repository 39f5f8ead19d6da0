"""Find the local modelfleet-dev cluster, and refuse every other one.

`hack/cluster.sh up` writes `.cache/kubeconfig` and `.cache/cluster.env`.  The guard accepts a
kubeconfig only when its context is the one the script created, its API server is on loopback,
and the live cluster's kube-system namespace has the UID recorded at creation.  A UID is unique
per cluster, so a user's real cluster can never pass, whatever its context is called.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache"
KUBECONFIG_PATH = CACHE_DIR / "kubeconfig"
IDENTITY_PATH = CACHE_DIR / "cluster.env"
CLUSTER_SCRIPT = REPO_ROOT / "hack" / "cluster.sh"
BIN_DIR = CACHE_DIR / "bin"
EXPECTED_CONTEXT = "kwok-modelfleet-dev"


class UnsafeClusterError(RuntimeError):
    """The kubeconfig does not point at the cluster that `make cluster-up` created."""


@dataclass(frozen=True)
class ClusterIdentity:
    context: str
    server: str
    kube_system_uid: str


def parse_identity(text: str) -> ClusterIdentity:
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    try:
        return ClusterIdentity(
            context=values["CONTEXT"], server=values["SERVER"], kube_system_uid=values["KUBE_SYSTEM_UID"]
        )
    except KeyError as missing:
        raise UnsafeClusterError(f"cluster identity file lacks {missing}; run `make cluster-up`") from None


def is_loopback_url(url: str) -> bool:
    host = urlparse(url).hostname
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_kubeconfig(kubeconfig: dict[str, object], identity: ClusterIdentity) -> str:
    """Validate a parsed kubeconfig against the recorded identity; return the context to use."""
    if identity.context != EXPECTED_CONTEXT:
        raise UnsafeClusterError(f"recorded context {identity.context!r} is not {EXPECTED_CONTEXT!r}")
    contexts = {c["name"]: c["context"] for c in kubeconfig.get("contexts") or []}  # type: ignore[attr-defined]
    if identity.context not in contexts:
        raise UnsafeClusterError(f"kubeconfig has no context {identity.context!r}; run `make cluster-up`")
    cluster_name = contexts[identity.context]["cluster"]
    clusters = {c["name"]: c["cluster"] for c in kubeconfig.get("clusters") or []}  # type: ignore[attr-defined]
    server = clusters.get(cluster_name, {}).get("server", "")
    if not is_loopback_url(server):
        raise UnsafeClusterError(f"context {identity.context!r} points at {server!r}, which is not loopback")
    if server != identity.server:
        raise UnsafeClusterError(f"context {identity.context!r} points at {server!r}, not at {identity.server!r}")
    return identity.context


def check_live_uid(identity: ClusterIdentity, live_kube_system_uid: str) -> None:
    if live_kube_system_uid != identity.kube_system_uid:
        raise UnsafeClusterError(
            "the API server's kube-system UID differs from the one `make cluster-up` recorded; "
            "refusing to run tests against a cluster this checkout did not create"
        )


def load_guarded_context(
    kubeconfig_path: Path = KUBECONFIG_PATH, identity_path: Path = IDENTITY_PATH
) -> tuple[ClusterIdentity, str]:
    if not identity_path.is_file() or not kubeconfig_path.is_file():
        raise UnsafeClusterError("no local cluster recorded; run `make cluster-up`")
    identity = parse_identity(identity_path.read_text())
    kubeconfig = yaml.safe_load(kubeconfig_path.read_text()) or {}
    return identity, check_kubeconfig(kubeconfig, identity)
