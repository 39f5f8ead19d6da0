"""The stack for real: the chart's images built here, its pods running on the real node.

Everything else in e2e stops at the API server (kwok marks pods Running without a container). Here
the node is real (hack/node.sh: containerd, runc, kubelet, kube-proxy, CoreDNS), the images are the
ones `hack/images.sh` builds from the repository's Dockerfiles, and the chart is installed with
Helm 3 and with Helm 4 into a namespace that enforces Pod Security "restricted".
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.e2e.conftest import Cluster, namespace_name_for, wait_for
from tests.support.cluster import BIN_DIR

pytestmark = [pytest.mark.e2e, pytest.mark.realnode]

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


@pytest.fixture(scope="module")
def real_node(cluster: Cluster) -> client.V1Node:
    node: client.V1Node = client.CoreV1Api(cluster.api).read_node(NODE_NAME)
    return node


@pytest.fixture(scope="module")
def node_images(real_node: client.V1Node) -> list[str]:
    """Build the images (cached by content and by buildah's layers) and import them into the node."""
    run([str(REPO / "hack" / "images.sh"), "build"], "hack/images.sh build", timeout=3600)
    archives = sorted((REPO / ".cache" / "images").glob("*.tar"))
    assert archives, "hack/images.sh build wrote no archives to .cache/images"
    for archive in archives:
        run([str(REPO / "hack" / "node.sh"), "import", str(archive)], f"importing {archive.name}")
    return [archive.name for archive in archives]


def test_the_real_node_runs_containerd_beside_the_kwok_nodes(cluster: Cluster, real_node: client.V1Node) -> None:
    nodes = client.CoreV1Api(cluster.api).list_node().items
    fake = {n.metadata.name for n in nodes if (n.metadata.annotations or {}).get("kwok.x-k8s.io/node") == "fake"}
    assert fake == {"gpu-node-0", "gpu-node-1", "cpu-node-0"}
    assert {n.metadata.name for n in nodes} == {*fake, NODE_NAME}
    info = real_node.status.node_info
    assert info.container_runtime_version.startswith("containerd://"), info.container_runtime_version
    assert info.kubelet_version.startswith("v1."), info.kubelet_version
    ready = next(c for c in real_node.status.conditions if c.type == "Ready")
    assert ready.status == "True", ready.message
    # The kubelet reports the node, not kwok: kwok's fake status says "kwok" in its reason.
    assert ready.reason == "KubeletReady", ready.reason
    addresses = {a.type: a.address for a in real_node.status.addresses}
    assert addresses["InternalIP"] == BRIDGE_ADDRESS
    # Tainted, so that only workloads that ask for it land there.
    assert [(t.key, t.effect) for t in real_node.spec.taints or []] == [("modelfleet.io/real-node", "NoSchedule")]


# The chart, installed for real -----------------------------------------------------------------


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
        applied by `kubectl apply --server-side` (as the README's upgrade step does), whose fields
        conflict: Helm 4 must take them over, as a user who applied them with kubectl must too."""
        return ["--force-conflicts"] if self.helm.name == "helm4" else []

    def run(self, *args: str, timeout: float = 900) -> str:
        argv = [str(self.helm), "--kubeconfig", str(self.cluster.kubeconfig), "--kube-context", self.cluster.context,
                "--namespace", self.namespace, *args]  # fmt: skip
        started = time.monotonic()
        out = run(argv, f"{self.helm.name} {' '.join(args[:2])}", timeout=timeout)
        self.log.append(f"{self.helm.name} {args[0]}: {time.monotonic() - started:.1f}s")
        return out

    def pods(self, component: str) -> list[client.V1Pod]:
        selector = f"app.kubernetes.io/instance={self.name},app.kubernetes.io/component={component}"
        pods: list[client.V1Pod] = (
            client.CoreV1Api(self.cluster.api).list_namespaced_pod(self.namespace, label_selector=selector).items
        )
        return pods


def helm_binaries() -> list[str]:
    return ["helm", "helm4"]


@pytest.fixture(scope="module", params=helm_binaries())
def release(
    request: pytest.FixtureRequest, cluster: Cluster, node_images: list[str], inferencemodel_crd: str
) -> Iterator[Release]:
    """The chart installed by Helm 3 or Helm 4 into a namespace that enforces Pod Security "restricted".

    One install per Helm version: its tests run in file order (install and `helm test`, upgrade,
    uninstall), so each step starts from what the one before left, as a user's would.
    """
    helm = BIN_DIR / request.param
    assert helm.is_file(), f"{helm} is missing (make tools)"
    namespace = namespace_name_for(f"chart-{request.param}")
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
                       *handle.crd_options())  # fmt: skip
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{pod_report(cluster, namespace)}") from None
        yield handle
    finally:
        # Models first, while their operator still runs to release its finalizer.
        cluster.kubectl(
            "-n", namespace, "delete", "inferencemodels.modelfleet.io", "--all", "--timeout=120s", check=False
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


def running_with_real_containers(pods: list[client.V1Pod]) -> None:
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
    service = core.read_namespaced_service(f"{release.fullname}-router", release.namespace)
    (port,) = [p.node_port for p in service.spec.ports]
    return f"http://{BRIDGE_ADDRESS}:{port}"


def get_json(url: str, key: str, timeout: float = 10) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}", "Connection": "close"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_chart_pods_run_for_real_and_pass_helm_test(release: Release, cluster: Cluster) -> None:
    namespace = release.namespace
    operators, routers, redis = release.pods("operator"), release.pods("router"), release.pods("redis")
    assert (len(operators), len(routers), len(redis)) == (2, 2, 1)
    for pods in (operators, routers, redis):
        running_with_real_containers(pods)

    # `kubectl logs` reaches the kubelet: the router logged its start, the operator its peering.
    router_log = cluster.kubectl("-n", namespace, "logs", routers[0].metadata.name).stdout
    assert "Uvicorn running" in router_log or "Application startup complete" in router_log, router_log[-2000:]

    # Exactly one operator works: both heartbeat into the namespace's peering object, at distinct
    # priorities, and the lower one pauses in favour of the other.
    custom = client.CustomObjectsApi(cluster.api)

    def peers() -> dict[str, Any]:
        peering = custom.get_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", release.fullname)
        found: dict[str, Any] = peering.get("status") or {}
        return found

    wait_for(lambda: len(peers()) == 2, "both operator replicas to heartbeat into the peering object", timeout=ROLLOUT)
    assert sorted(peer["priority"] for peer in peers().values()) == [99, 100], peers()

    # The active operator reconciles a model in the watched namespace: its reachability probe of the
    # endpoint (the router's own Service, by DNS name) runs from inside the cluster.
    endpoint = f"http://{release.fullname}-router.{namespace}.svc"
    model = {"apiVersion": "modelfleet.io/v1alpha1", "kind": "InferenceModel",
             "metadata": {"name": "echo", "namespace": namespace},
             "spec": {"model": "gemma3:270m", "endpoint": {"url": endpoint}}}  # fmt: skip
    custom.create_namespaced_custom_object("modelfleet.io", "v1alpha1", namespace, "inferencemodels", model)

    def model_ready() -> bool:
        found = custom.get_namespaced_custom_object("modelfleet.io", "v1alpha1", namespace, "inferencemodels", "echo")
        conditions = (found.get("status") or {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    wait_for(model_ready, "the in-cluster operator to reconcile the model to Ready", timeout=120)
    # The operator prefixes each object's messages with [namespace/name]: only priority 100 handled it.
    logs = {
        pod: cluster.kubectl("-n", namespace, "logs", f"{release.fullname}-operator-{pod}").stdout for pod in (0, 1)
    }
    assert f"[{namespace}/echo]" in logs[0], logs[0][-2000:]
    assert f"[{namespace}/echo]" not in logs[1], logs[1][-2000:]
    # Neither replica met an error on its way (a forbidden list, a crash-looping handler...).
    for replica, text in logs.items():
        assert "[ERROR" not in text, f"operator-{replica}:\n{text[-3000:]}"

    # From the host, through the NodePort on the bridge (kube-proxy), the router serves the model
    # that it discovered through the API server's `kubernetes` Service.
    key = api_key(release)
    url = node_port_url(release)

    def listed() -> bool:
        status, body = get_json(f"{url}/v1/models", key)
        return status == 200 and "echo" in [m["id"] for m in body["data"]]

    wait_for(listed, "the router pods to list the model discovered in the cluster", timeout=60)

    # `helm test`: a pod inside the cluster resolves the router's Service name and checks its health.
    # Its assertions (discovery synced, Redis reachable) fail the pod, and so `helm test`; the pod is
    # deleted once it succeeds (hook-succeeded), so there are no logs to read afterwards.
    out = release.run("test", release.name, "--timeout", f"{ROLLOUT}s")
    assert "Phase:          Succeeded" in out, out


@dataclass
class RequestLoop:
    """A light request loop against the router from the host; records every failure."""

    url: str
    key: str
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status, body = get_json(f"{self.url}/v1/models", self.key, timeout=10)
                if status == 200:
                    self.answered += 1
                else:
                    self.failures.append(f"{status}: {body}")
            except Exception as exc:  # every failure counts, whatever its kind
                self.failures.append(repr(exc))
            # About 80 requests a minute: the chart's default rate limit is 100 per key and minute.
            self.stop.wait(0.75)


def test_upgrade_rolls_the_router_without_a_failed_request(release: Release, cluster: Cluster) -> None:
    key = api_key(release)
    before = {pod.metadata.name for pod in release.pods("router")}
    keys_before = cluster.kubectl("-n", release.namespace, "get", "secret", f"{release.fullname}-api-keys",
                                  "-o", "jsonpath={.data}").stdout  # fmt: skip
    loop = RequestLoop(node_port_url(release), key)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: loop.answered >= 5, "the request loop to get its first answers", timeout=60)
        release.run("upgrade", release.name, str(CHART), "--reuse-values", "--set", "router.defaultMaxTokens=128",
                    "--wait", "--timeout", f"{ROLLOUT}s")  # fmt: skip
        wait_for(lambda: not before & {p.metadata.name for p in release.pods("router")},
                 "the old router pods to be gone", timeout=ROLLOUT)  # fmt: skip
        answered_after_rollout = loop.answered
        wait_for(lambda: loop.answered >= answered_after_rollout + 5 or len(loop.failures) > 5,
                 "answers from the new router pods", timeout=60)  # fmt: skip
    finally:
        loop.stop.set()
        thread.join(timeout=30)
    routers = release.pods("router")
    running_with_real_containers(routers)
    for pod in routers:
        env = {e.name: e.value for e in pod.spec.containers[0].env}
        assert env.get("MODELFLEET_DEFAULT_MAX_TOKENS") == "128", env
    assert loop.failures == [], (
        f"{len(loop.failures)} of {loop.answered + len(loop.failures)} failed: {loop.failures[:5]}"
    )
    # Clients keep their keys across upgrades.
    keys_after = cluster.kubectl("-n", release.namespace, "get", "secret", f"{release.fullname}-api-keys",
                                 "-o", "jsonpath={.data}").stdout  # fmt: skip
    assert keys_after == keys_before


def test_uninstall_leaves_nothing_but_the_crds_and_the_kept_key_secret(release: Release, cluster: Cluster) -> None:
    namespace = release.namespace
    # As the README says: models first, so that the operator releases their finalizer.
    cluster.kubectl("-n", namespace, "delete", "inferencemodels.modelfleet.io", "--all", "--timeout=120s")
    release.run("uninstall", release.name, "--wait", "--timeout", "180s")
    selector = f"app.kubernetes.io/instance={release.name}"
    wait_for(lambda: not release.pods("operator") + release.pods("router") + release.pods("redis"),
             "every pod of the release to be gone", timeout=180)  # fmt: skip
    kinds = (
        "all,configmaps,secrets,serviceaccounts,roles,rolebindings,networkpolicies,poddisruptionbudgets,kopfpeerings"
    )
    leftovers = cluster.kubectl("get", kinds, "-n", namespace, "-l", selector, "-o", "name").stdout.split()
    # The generated API keys carry helm.sh/resource-policy: keep, so that a reinstall keeps the clients' keys.
    assert leftovers == [f"secret/{release.fullname}-api-keys"], leftovers
    cluster_scoped = cluster.kubectl("get", "clusterroles,clusterrolebindings,clusterkopfpeerings", "-l", selector,
                                     "-o", "name").stdout.split()  # fmt: skip
    assert cluster_scoped == [], cluster_scoped
    crds = cluster.kubectl("get", "crd", "-o", "name").stdout.split()
    assert "customresourcedefinition.apiextensions.k8s.io/inferencemodels.modelfleet.io" in crds
    # And on the node itself, the kubelet has removed every container and sandbox of those pods.
    wait_for(
        lambda: node_containers(namespace) == [], "the node's containers of the release to be removed", timeout=180
    )


def node_containers(namespace: str) -> list[str]:
    """IDs of the real node's containers (and sandboxes) that belong to pods of `namespace`, from containerd."""
    socket = "/run/modelfleet-node/containerd.sock"
    label = f'labels."io.kubernetes.pod.namespace"=={namespace}'
    out = run(
        ["ctr", "--address", socket, "--namespace", "k8s.io", "containers", "ls", "-q", label], "ctr containers ls"
    )
    return out.split()
