"""The local cluster for e2e tests: brought up if needed, guarded, and a namespace per test."""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
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
from tests.support.procs import wait_until


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


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60, interval: float = 0.25) -> None:
    """`wait_until` with an error that names what the test was waiting for."""
    started = time.monotonic()
    try:
        wait_until(condition, timeout=timeout, interval=interval)
    except TimeoutError:
        raise AssertionError(f"timed out after {time.monotonic() - started:.0f}s waiting for {what}") from None


CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "modelfleet.io_inferencemodels.yaml"


@pytest.fixture(scope="session")
def inferencemodel_crd(cluster: Cluster) -> str:
    """The generated InferenceModel CRD, server-side applied and Established; returns its name."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_PATH))
    name = "inferencemodels.modelfleet.io"
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    return name
