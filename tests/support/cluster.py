"""Find the local modelfleet-dev cluster, and refuse every other one.

`hack/cluster.sh up` writes `.cache/kubeconfig` and `.cache/cluster.env`.  The guard accepts a
kubeconfig only when its context is the one the script created, its API server is on loopback,
and the live cluster's kube-system namespace has the UID recorded at creation.  A UID is unique
per cluster, so a user's real cluster can never pass, whatever its context is called.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import time
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


# The control plane's processes, for the API server restart fault -------------------------------

KWOK_CLUSTER_DIR = CACHE_DIR / "kwok" / "clusters" / "modelfleet-dev"
# The API server's audit log: every request of the e2e tests' operator account, one JSON line each
# (hack/cluster/audit-policy.yaml).
OPERATOR_AUDIT_LOG = KWOK_CLUSTER_DIR / "logs" / "operator-audit.log"
# The binary each kwokctl component runs (its pid file is named after the component).
COMPONENT_BINARIES = {
    "kube-apiserver": "kube-apiserver",
    "kube-controller-manager": "kube-controller-manager",
    "kube-scheduler": "kube-scheduler",
    "kwok-controller": "kwok-controller",
}


@dataclass(frozen=True)
class ComponentProcess:
    """How kwokctl started a control-plane component, read back from /proc so it can be started again."""

    name: str
    pid: int
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    cluster_dir: Path

    @classmethod
    def current(cls, name: str, cluster_dir: Path = KWOK_CLUSTER_DIR) -> ComponentProcess:
        pid = int((cluster_dir / "pids" / f"{name}.pid").read_text().strip())
        proc = Path(f"/proc/{pid}")
        argv = [part.decode() for part in proc.joinpath("cmdline").read_bytes().split(b"\0") if part]
        if not argv or Path(argv[0]).name != COMPONENT_BINARIES[name]:
            raise UnsafeClusterError(f"pid {pid} from {cluster_dir}/pids is not {name}: {argv[:1]}")
        environ = proc.joinpath("environ").read_bytes().split(b"\0")
        env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
        return cls(name=name, pid=pid, argv=argv, env=env, cwd=Path(os.readlink(proc / "cwd")),
                   cluster_dir=cluster_dir)  # fmt: skip

    def alive(self) -> bool:
        return runs(self.pid, self.argv[0])

    def running_again(self) -> bool:
        """Whether the process its pid file names now (the original or a restart) is running."""
        pid = int((self.cluster_dir / "pids" / f"{self.name}.pid").read_text().strip())
        return runs(pid, self.argv[0])

    def stop(self, timeout: float = 30) -> None:
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)

    def start(self) -> ComponentProcess:
        """Start it again as kwokctl did (own session, same log, new pid file), so that
        `hack/cluster.sh down` still finds and stops it."""
        with (self.cluster_dir / "logs" / f"{self.name}.log").open("ab") as log:
            process = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        (self.cluster_dir / "pids" / f"{self.name}.pid").write_text(str(process.pid))
        return ComponentProcess(self.name, process.pid, self.argv, self.env, self.cwd, self.cluster_dir)


def runs(pid: int, binary: str) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode() == binary
    except OSError:
        return False


def restart_exited(components: list[ComponentProcess]) -> list[str]:
    """Start again every component that has exited, as kubelet restarts static pods; returns their names."""
    restarted = []
    for component in components:
        if not component.running_again():
            component.start()
            restarted.append(component.name)
    return restarted
