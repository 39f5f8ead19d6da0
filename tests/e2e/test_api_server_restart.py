"""The API server goes away and comes back (the real kube-apiserver process, stopped and started
again with kwokctl's own command line).

kube-controller-manager and kube-scheduler exit when they cannot renew their leader lease (10 s),
as they do in any cluster, where kubelet restarts their static pods.  kwokctl does not supervise
its processes, so the test restarts whichever exited, as kubelet would.

The operator and the router keep running through the outage, the router keeps serving what it
knew, and both resume their watches by themselves and pick up every change made since: a new
model, a changed spec, a deleted model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from modelfleet.api import v1alpha1
from tests.conftest import RouterServer, running_router
from tests.e2e.conftest import Cluster, OperatorProcess, wait_for
from tests.support.cluster import COMPONENT_BINARIES, ComponentProcess, restart_exited

pytestmark = [pytest.mark.e2e, pytest.mark.disruptive]

OUTAGE_SECONDS = 15.0  # longer than the controllers' lease renew deadline: they exit, deterministically


def create(cluster: Cluster, namespace: str, name: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": f"{v1alpha1.GROUP}/{v1alpha1.VERSION}", "kind": v1alpha1.KIND,
            "metadata": {"name": name}, "spec": spec}  # fmt: skip
    client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, body
    )


def managed(cpu: str) -> dict[str, Any]:
    return {"runtime": "ollama", "model": "gemma3:270m", "resources": {"gpu": 0, "cpu": cpu}}


def endpoint() -> dict[str, Any]:
    return {"model": "gemma3:270m", "endpoint": {"url": "http://127.0.0.1:9/", "api": "ollama"}}


def deployment_cpu(cluster: Cluster, namespace: str, name: str) -> str | None:
    try:
        deployment = client.AppsV1Api(cluster.api).read_namespaced_deployment(f"im-{name}", namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    requests = deployment.spec.template.spec.containers[0].resources.requests or {}
    cpu: str | None = requests.get("cpu")
    return cpu


def observed_generation(cluster: Cluster, namespace: str, name: str) -> int | None:
    body = client.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, name
    )
    generation: int | None = (body.get("status") or {}).get("observedGeneration")
    return generation


LEADER_ELECTED = ("kube-controller-manager", "kube-scheduler")


def lease_holders(cluster: Cluster) -> dict[str, str | None]:
    coordination = client.CoordinationV1Api(cluster.api)
    return {
        name: coordination.read_namespaced_lease(name, "kube-system").spec.holder_identity for name in LEADER_ELECTED
    }


def served(router: RouterServer) -> set[str]:
    return {model["id"] for model in httpx.get(f"{router.openai_base_url}/models", timeout=5).json()["data"]}


def api_ready(cluster: Cluster) -> bool:
    return cluster.kubectl("get", "--raw", "/readyz", check=False).returncode == 0


@pytest.fixture
def discovering_router(namespace: str, router_kubeconfig: Path, tmp_path: Path) -> Iterator[RouterServer]:
    with running_router(tmp_path, [], kubernetes_discovery="true", kubeconfig=str(router_kubeconfig),
                        kubernetes_namespace=namespace) as router:  # fmt: skip
        yield router


def test_after_an_api_server_restart_the_watches_resume_and_catch_up(
    cluster: Cluster, namespace: str, operator: OperatorProcess, discovering_router: RouterServer
) -> None:
    router = discovering_router
    create(cluster, namespace, "kept", managed("100m"))
    create(cluster, namespace, "ep-old", endpoint())
    wait_for(lambda: deployment_cpu(cluster, namespace, "kept") == "100m", "the operator to create kept's Deployment")
    wait_for(lambda: served(router) == {"kept", "ep-old"}, "the router to list both models")

    holders_before = lease_holders(cluster)
    components = [ComponentProcess.current(name) for name in COMPONENT_BINARIES]
    api_server = components[0]
    stopped_at = time.monotonic()
    api_server.stop()
    restarted: list[str] = []
    try:
        time.sleep(OUTAGE_SECONDS)
        # Through the outage the router serves what it knew, and neither process gave up.
        assert served(router) == {"kept", "ep-old"}
        assert httpx.get(f"{router.base_url}/livez", timeout=5).status_code == 200
        assert operator.process.process.poll() is None, operator.process.log_tail()
        assert router.process.process.poll() is None, router.process.log_tail()
    finally:
        restarted = restart_exited(components)
    wait_for(lambda: api_ready(cluster), "the API server to come back", timeout=120, interval=0.5)
    back_at = time.monotonic()

    try:
        # Changes made at once, before the clients' watches have had a chance to reconnect.
        create(cluster, namespace, "added", managed("100m"))
        client.CustomObjectsApi(cluster.api).patch_namespaced_custom_object(
            v1alpha1.GROUP,
            v1alpha1.VERSION,
            namespace,
            v1alpha1.PLURAL,
            "kept",
            {"spec": {"resources": {"cpu": "200m"}}},
        )
        client.CustomObjectsApi(cluster.api).delete_namespaced_custom_object(
            v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, "ep-old"
        )
        create(cluster, namespace, "ep-new", endpoint())

        wait_for(lambda: served(router) == {"kept", "added", "ep-new"}, "the router to catch up", timeout=90)
        router_caught_up = time.monotonic() - back_at
        wait_for(
            lambda: (
                observed_generation(cluster, namespace, "added") == 1
                and deployment_cpu(cluster, namespace, "kept") == "200m"
            ),
            "the operator to reconcile added and update kept's Deployment",
            timeout=90,
        )
        operator_caught_up = time.monotonic() - back_at
        # added's Deployment follows its weights Job, which needs the restarted controller-manager.
        wait_for(lambda: deployment_cpu(cluster, namespace, "added") == "100m", "added's Deployment", timeout=120)
        assert httpx.get(f"{router.base_url}/readyz", timeout=5).status_code == 200
    finally:
        # Whatever happens, leave the cluster whole for what runs next: every component running, and
        # the restarted controllers leading again (they take over once the old leases expire).
        restarted += restart_exited(components)
        wait_for(
            lambda: all(
                lease_holders(cluster)[name] != holders_before[name] for name in LEADER_ELECTED if name in restarted
            ),
            "the restarted controller-manager and scheduler to hold their leases",
            timeout=90,
        )
    print(f"\nrestarted after the outage: {restarted}")
    print(
        f"\nAPI server down {back_at - stopped_at:.1f} s (stop, {OUTAGE_SECONDS:.0f} s outage, start); "
        "after it was back, "
        f"router caught up in {router_caught_up:.1f} s, operator in {operator_caught_up:.1f} s"
    )
