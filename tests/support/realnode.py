"""Shared by the e2e tests that run on the real node: its settings, the chart installs, small HTTP helpers."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

from tests.support.procs import wait_for

# tests.e2e.conftest.Cluster (the e2e suite's handle on the API server); not imported, so that the
# type check of tests/support does not pull in the e2e suite.
Cluster = Any

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelfleet"
REALNODE_VALUES = REPO / "hack" / "cluster" / "realnode-values.yaml"
NETWORK = dict(
    line.split("=", 1)
    for line in (REPO / "hack" / "cluster" / "network.env").read_text().splitlines()
    if "=" in line and not line.startswith("#")
)
NODE_NAME = NETWORK["node_name"]
BRIDGE_ADDRESS = NETWORK["bridge_address"]
# Starting Python and Kopf on a shared 2-core machine can take a while; these are bounds, not goals.
ROLLOUT = 300


def run(argv: list[str], what: str, timeout: float = 900) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{what} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout


@dataclass
class Release:
    helm: Path
    namespace: str
    cluster: Cluster
    log: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """Unique per install (its cluster-scoped objects carry it), so a killed run never blocks the next."""
        return f"mf-{self.namespace[-6:]}"

    @property
    def fullname(self) -> str:
        return f"{self.name}-modelfleet"

    def crd_options(self) -> list[str]:
        """Helm 3 leaves existing CRDs alone. Helm 4 server-side applies them, and the CRDs here were
        applied by `kubectl apply --server-side` (as docs/chart.md's upgrade step does), whose fields
        conflict: Helm 4 must take them over, as a user who applied them with kubectl must too."""
        return ["--force-conflicts"] if self.helm.name == "helm4" else []

    def run(self, *args: str, timeout: float = 900) -> str:
        argv = [str(self.helm), "--kubeconfig", str(self.cluster.kubeconfig), "--kube-context", self.cluster.context,
                "--namespace", self.namespace, *args]  # fmt: skip
        started = time.monotonic()
        out = run(argv, f"{self.helm.name} {' '.join(args[:2])}", timeout=timeout)
        self.log.append(f"{self.helm.name} {args[0]}: {time.monotonic() - started:.1f}s")
        return out

    def pods(self, component: str) -> list[Any]:
        selector = f"app.kubernetes.io/instance={self.name},app.kubernetes.io/component={component}"
        pods: list[Any] = (
            client.CoreV1Api(self.cluster.api).list_namespaced_pod(self.namespace, label_selector=selector).items
        )
        return pods


def installed_release(
    cluster: Cluster, helm: Path, namespace: str, extra_args: tuple[str, ...] = ()
) -> Iterator[Release]:
    """The chart installed into a new namespace that enforces Pod Security "restricted", its operator
    scoped to that namespace; models in it are deleted, then the release and the namespace, afterwards."""
    assert helm.is_file(), f"{helm} is missing (make tools)"
    core = client.CoreV1Api(cluster.api)
    labels = {"modelfleet.io/test": "e2e", "pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}  # fmt: skip
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace, labels=labels)))
    handle = Release(helm=helm, namespace=namespace, cluster=cluster)
    try:
        try:
            # Scoped to its own namespace, so that it never reconciles what other tests create.
            handle.run("install", handle.name, str(CHART), "--values", str(REALNODE_VALUES),
                       "--set-json", f'operator.watchNamespaces=["{namespace}"]', "--wait", "--timeout", f"{ROLLOUT}s",
                       *handle.crd_options(), *extra_args)  # fmt: skip
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{pod_report(cluster, namespace)}") from None
        yield handle
    finally:
        # Models first, while their operator still runs to release its finalizer.
        cluster.kubectl(
            "-n", namespace, "delete", "inferencemodels.modelfleet.io", "--all", "--timeout=180s", check=False
        )
        handle.run("uninstall", handle.name, "--wait", "--timeout", "120s", "--ignore-not-found")
        core.delete_namespace(namespace, propagation_policy="Background")
        print("\n".join(handle.log))


def pod_report(cluster: Cluster, namespace: str) -> str:
    """What a failed rollout left: the pods, their events, and the last logs of their containers."""
    report = [cluster.kubectl("-n", namespace, "get", "pods", "-o", "wide", check=False).stdout]
    report.append(
        cluster.kubectl("-n", namespace, "get", "events", "--sort-by=.lastTimestamp", check=False).stdout[-3000:]
    )
    for pod in cluster.kubectl("-n", namespace, "get", "pods", "-o", "name", check=False).stdout.split():
        logs = cluster.kubectl("-n", namespace, "logs", pod, "--all-containers", "--tail=20", check=False)
        previous = cluster.kubectl(
            "-n", namespace, "logs", pod, "--all-containers", "--tail=20", "--previous", check=False
        )
        report.append(f"--- {pod}\n{logs.stdout}{logs.stderr}\n(previous) {previous.stdout}")
    return "\n".join(report)


def running_with_real_containers(pods: list[Any]) -> None:
    for pod in pods:
        assert pod.spec.node_name == NODE_NAME, f"{pod.metadata.name} runs on {pod.spec.node_name}"
        assert pod.status.phase == "Running", f"{pod.metadata.name}: {pod.status.phase}"
        for status in pod.status.container_statuses:
            assert status.ready, f"{pod.metadata.name}/{status.name} is not ready"
            assert status.restart_count == 0, f"{pod.metadata.name}/{status.name} restarted {status.restart_count}x"
            assert status.container_id.startswith("containerd://"), status.container_id
            assert status.state.running is not None


def api_key(release: Release, which: str = "user-key") -> str:
    encoded = release.cluster.kubectl("-n", release.namespace, "get", "secret", f"{release.fullname}-api-keys", "-o",
                                      f"jsonpath={{.data.{which}}}").stdout  # fmt: skip
    return base64.b64decode(encoded).decode()


def node_port_url(release: Release) -> str:
    core = client.CoreV1Api(release.cluster.api)
    service: Any = core.read_namespaced_service(f"{release.fullname}-router", release.namespace)
    (port,) = [p.node_port for p in service.spec.ports]
    return f"http://{BRIDGE_ADDRESS}:{port}"


def get_json(url: str, key: str, timeout: float = 10) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}", "Connection": "close"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def node_containers(namespace: str) -> list[str]:
    """IDs of the real node's containers (and sandboxes) that belong to pods of `namespace`, from containerd."""
    socket = "/run/modelfleet-node/containerd.sock"
    label = f'labels."io.kubernetes.pod.namespace"=={namespace}'
    out = run(
        ["ctr", "--address", socket, "--namespace", "k8s.io", "containers", "ls", "-q", label], "ctr containers ls"
    )
    return out.split()


@dataclass
class RequestLoop:
    """One request after another from the host until stopped; every failure is kept.

    `request` returns None when it was answered, else what went wrong. About 75 requests a minute:
    the chart's default rate limit is 100 per key and minute.
    """

    request: Callable[[], str | None]
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                failure = self.request()
            except Exception as exc:  # every failure counts, whatever its kind
                failure = repr(exc)
            if failure is None:
                self.answered += 1
            else:
                self.failures.append(failure)
            self.stop.wait(0.8)

    def start(self) -> RequestLoop:
        """Start sending without waiting for an answer (for a model that does not serve yet)."""
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def __enter__(self) -> RequestLoop:
        self.start()
        wait_for(lambda: self.answered >= 2 or bool(self.failures), "the request loop's first answers", timeout=120)
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=150)
            if self.thread.is_alive():
                # A request that never ended is not an answer.
                self.failures.append("a request was still running when the loop stopped")
