"""The local cluster for e2e tests: brought up if needed, guarded, and a namespace per test."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tests.support.cluster import (
    BIN_DIR,
    CLUSTER_SCRIPT,
    KUBECONFIG_PATH,
    ClusterIdentity,
    UnsafeClusterError,
    check_live_uid,
    load_guarded_context,
)
from tests.support.procs import LOOPBACK, RunningProcess, free_port, running_process, wait_until

# Re-exported: the e2e tests import it from here.
from tests.support.procs import wait_for as wait_for

if TYPE_CHECKING:
    from tests.support.managed import RegistryModel


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that stop part of the control plane run last, so no other test meets it recovering."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


@dataclass
class Cluster:
    identity: ClusterIdentity
    context: str
    kubeconfig: Path
    api: client.ApiClient

    def kubectl(
        self, *args: str, check: bool = True, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this cluster only, whatever $KUBECONFIG says."""
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        argv = [str(BIN_DIR / "kubectl"), "--kubeconfig", str(self.kubeconfig), "--context", self.context, *args]
        result = subprocess.run(argv, capture_output=True, text=True, env=env, input=input_text, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result


def client_with_token(cluster: Cluster, token: str) -> client.ApiClient:
    """A client that authenticates with a ServiceAccount's bearer token, not the admin certificate."""
    configuration = client.Configuration()
    configuration.host = cluster.api.configuration.host
    configuration.ssl_ca_cert = cluster.api.configuration.ssl_ca_cert
    configuration.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(configuration)


def bring_cluster_up() -> None:
    status = subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True)
    if status.returncode == 0:
        return
    up = subprocess.run([str(CLUSTER_SCRIPT), "up"], capture_output=True, text=True, timeout=3600)
    if up.returncode != 0:
        pytest.fail(f"`hack/cluster.sh up` failed:\n{up.stdout}\n{up.stderr}", pytrace=False)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The modelfleet-dev cluster, after the guard has proved it is the one this checkout created."""
    bring_cluster_up()
    try:
        identity, context = load_guarded_context()
    except UnsafeClusterError as exc:
        pytest.fail(f"refusing to run e2e tests: {exc}", pytrace=False)
    api = config.new_client_from_config(config_file=str(KUBECONFIG_PATH), context=context)
    live_uid = client.CoreV1Api(api).read_namespace("kube-system").metadata.uid
    try:
        check_live_uid(identity, live_uid)
    except UnsafeClusterError as exc:
        pytest.fail(f"refusing to run e2e tests: {exc}", pytrace=False)
    try:
        yield Cluster(identity=identity, context=context, kubeconfig=KUBECONFIG_PATH, api=api)
    finally:
        api.close()


def namespace_name_for(test_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"t-{slug}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test (with its default ServiceAccount), deleted afterwards."""
    core = client.CoreV1Api(cluster.api)
    name = namespace_name_for(request.node.name)
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"modelfleet.io/test": "e2e"}))
    )
    # Pods are refused until the controller-manager has created the namespace's default ServiceAccount.
    wait_until(lambda: core.read_namespaced_service_account("default", name) is not None, timeout=30, interval=0.2)
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise


CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "modelfleet.io_inferencemodels.yaml"


@pytest.fixture(scope="session")
def inferencemodel_crd(cluster: Cluster) -> str:
    """The generated InferenceModel CRD, server-side applied and Established; returns its name."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_PATH))
    name = "inferencemodels.modelfleet.io"
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    return name


# The operator process ------------------------------------------------------------------------

RBAC_PATH = Path(__file__).resolve().parents[2] / "manifests" / "rbac" / "operator.yaml"
OPERATOR_NAMESPACE = "modelfleet-system"
OPERATOR_ACCOUNT = "modelfleet-operator"


@dataclass
class OperatorProcess:
    process: RunningProcess
    kubeconfig: Path
    metrics_url: str
    liveness_url: str
    token: str


def service_account_kubeconfig(cluster: Cluster, token: str, path: Path) -> Path:
    """A kubeconfig that authenticates with the ServiceAccount's bound token only."""
    configuration = cluster.api.configuration
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": configuration.host,
                                                   "certificate-authority": configuration.ssl_ca_cert}}],
        "users": [{"name": OPERATOR_ACCOUNT, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "local", "user": OPERATOR_ACCOUNT}}],
        "current-context": "operator",
    }  # fmt: skip
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)
    return path


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as response:
        status: int = response.status
        return status == 200


def start_operator(
    cluster: Cluster,
    work_dir: Path,
    resync_seconds: float = 5.0,
    standalone: bool = True,
    priority: int = 0,
    namespaces: list[str] | None = None,
) -> Iterator[OperatorProcess]:
    """The operator as its own ServiceAccount; cluster-wide, or watching only `namespaces`."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(RBAC_PATH))
    token_request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(expiration_seconds=3600))
    token = (
        client.CoreV1Api(cluster.api)
        .create_namespaced_service_account_token(OPERATOR_ACCOUNT, OPERATOR_NAMESPACE, token_request)
        .status.token
    )
    kubeconfig = service_account_kubeconfig(cluster, token, work_dir / "operator.kubeconfig")
    liveness_port, metrics_port = free_port(), free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work_dir),
        "KUBECONFIG": str(kubeconfig),
        "MODELFLEET_OPERATOR_STANDALONE": str(standalone).lower(),
        "MODELFLEET_OPERATOR_PRIORITY": str(priority),
        "MODELFLEET_OPERATOR_RESYNC_SECONDS": str(resync_seconds),
        "MODELFLEET_OPERATOR_LIVENESS_HOST": LOOPBACK,
        "MODELFLEET_OPERATOR_LIVENESS_PORT": str(liveness_port),
        "MODELFLEET_OPERATOR_METRICS_HOST": LOOPBACK,
        "MODELFLEET_OPERATOR_METRICS_PORT": str(metrics_port),
        **({"MODELFLEET_OPERATOR_NAMESPACES": json.dumps(namespaces)} if namespaces else {}),
    }
    liveness_url = f"http://{LOOPBACK}:{liveness_port}/healthz"
    with running_process(
        "operator",
        [sys.executable, "-m", "modelfleet.operator"],
        work_dir,
        ready=lambda: http_ok(liveness_url),
        ready_timeout=60,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    ) as process:
        yield OperatorProcess(
            process=process,
            kubeconfig=kubeconfig,
            metrics_url=f"http://{LOOPBACK}:{metrics_port}/metrics",
            liveness_url=liveness_url,
            token=token,
        )


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, inferencemodel_crd: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator, running with exactly its ServiceAccount's permissions, for one test module."""
    yield from start_operator(cluster, tmp_path_factory.mktemp("operator"))


# The router's identity ------------------------------------------------------------------------

ROUTER_RBAC_PATH = Path(__file__).resolve().parents[2] / "manifests" / "rbac" / "router.yaml"
ROUTER_NAMESPACE = "modelfleet-system"
ROUTER_ACCOUNT = "modelfleet-router"


@pytest.fixture(scope="module")
def router_token(cluster: Cluster, inferencemodel_crd: str) -> str:
    """A bound token of the router's ServiceAccount (read InferenceModels and EndpointSlices, nothing else)."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROUTER_RBAC_PATH))
    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(expiration_seconds=3600))
    status = (
        client.CoreV1Api(cluster.api).create_namespaced_service_account_token(ROUTER_ACCOUNT, ROUTER_NAMESPACE, request)
    ).status
    assert status is not None
    assert status.token
    return str(status.token)


@pytest.fixture(scope="module")
def router_kubeconfig(cluster: Cluster, router_token: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return service_account_kubeconfig(cluster, router_token, tmp_path_factory.mktemp("router") / "kubeconfig")


# Prometheus Operator CRDs ---------------------------------------------------------------------

# Linked by `make tools` (hack/build_tools.py prometheus-operator-crds) to the CRDs of the
# prometheus-operator module pinned in hack/versions.env.
PROMETHEUS_OPERATOR_CRDS_DIR = Path(__file__).resolve().parents[2] / ".cache" / "crds" / "prometheus-operator"


@pytest.fixture(scope="session")
def prometheus_operator_crds(cluster: Cluster) -> list[str]:
    """Every Prometheus Operator CRD (ServiceMonitor, PodMonitor, PrometheusRule, ...) applied and Established.

    Returns the CRD names.  Server-side apply: several CRDs are larger than the 256 KiB that
    client-side apply's last-applied annotation allows.  Nothing is deleted afterwards: the
    cluster is shared, and other sessions' tests may be using the CRDs.
    """
    files = sorted(PROMETHEUS_OPERATOR_CRDS_DIR.glob("*.yaml")) if PROMETHEUS_OPERATOR_CRDS_DIR.is_dir() else []
    if not files:
        pytest.fail(f"no Prometheus Operator CRDs in {PROMETHEUS_OPERATOR_CRDS_DIR}; run `make tools`", pytrace=False)
    # Resolved: kubectl does not descend into a symlink to a directory (the link is one).
    crds_dir = str(PROMETHEUS_OPERATOR_CRDS_DIR.resolve())
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", crds_dir)
    cluster.kubectl("wait", "--for=condition=Established", "-f", crds_dir, "--timeout=60s")
    # monitoring.coreos.com_servicemonitors.yaml defines servicemonitors.monitoring.coreos.com.
    return [".".join(reversed(f.stem.split("_", 1))) for f in files]


@pytest.fixture
def http_endpoint() -> Iterator[str]:
    """The URL of a tiny real HTTP server on loopback: an external model server the operator can reach."""
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# The real node ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_node(cluster: Cluster) -> client.V1Node:
    from tests.support.realnode import NODE_NAME

    node: client.V1Node = client.CoreV1Api(cluster.api).read_node(NODE_NAME)
    return node


@pytest.fixture(scope="session")
def node_images(real_node: client.V1Node) -> list[str]:
    """Build the images (skipped when their inputs did not change) and import them into the node."""
    from tests.support.realnode import REPO, run

    run([str(REPO / "hack" / "images.sh"), "build"], "hack/images.sh build", timeout=3600)
    archives = sorted((REPO / ".cache" / "images").glob("*.tar"))
    assert archives, "hack/images.sh build wrote no archives to .cache/images"
    for archive in archives:
        run([str(REPO / "hack" / "node.sh"), "import", str(archive)], f"importing {archive.name}")
    return [archive.name for archive in archives]


@pytest.fixture(scope="session")
def registry_model(real_node: client.V1Node) -> RegistryModel:
    """gemma3:270m in the registry (pushed once; later runs find it there), and a variant of it."""
    from tests.support.managed import REGISTRY_MODEL, VARIANT, RegistryModel, registry_manifest
    from tests.support.realnode import REPO, run

    run([str(REPO / "hack" / "registry.sh"), "push"], "hack/registry.sh push", timeout=1800)
    run([str(REPO / "hack" / "registry.sh"), "push-variant", VARIANT, "PARAMETER num_predict 24"],
        "hack/registry.sh push-variant", timeout=600)  # fmt: skip
    manifest = registry_manifest(REGISTRY_MODEL)
    (weights,) = [layer for layer in manifest["layers"] if layer["mediaType"] == "application/vnd.ollama.image.model"]
    return RegistryModel(weights_digest=weights["digest"], weights_size=int(weights["size"]))
