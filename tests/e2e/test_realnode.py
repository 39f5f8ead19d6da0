"""The stack for real: the chart's images built here, its pods running on the real node.

Everything else in e2e stops at the API server (kwok marks pods Running without a container). Here
the node is real (hack/node.sh: containerd, runc, kubelet, kube-proxy, CoreDNS), the images are the
ones `hack/images.sh` builds from the repository's Dockerfiles, and the chart is installed with
Helm 3 and with Helm 4 into a namespace that enforces Pod Security "restricted".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client

from tests.e2e.conftest import Cluster, namespace_name_for, wait_for
from tests.support.cluster import BIN_DIR
from tests.support.realnode import (
    BRIDGE_ADDRESS,
    CHART,
    NETWORK,
    NODE_NAME,
    ROLLOUT,
    Release,
    RequestLoop,
    api_key,
    get_json,
    installed_release,
    node_containers,
    node_port_url,
    running_with_real_containers,
)

pytestmark = [pytest.mark.e2e, pytest.mark.realnode]


@pytest.mark.harness
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
    yield from installed_release(cluster, BIN_DIR / request.param, namespace_name_for(f"chart-{request.param}"))


def helm_test(release: Release, cluster: Cluster) -> str:
    """`helm test`; when it fails, the error carries the test pod's log (the pod stays until the next run)."""
    try:
        return release.run("test", release.name, "--timeout", f"{ROLLOUT}s")
    except AssertionError as failure:
        pod = f"{release.fullname}-test-health"
        log = cluster.kubectl("-n", release.namespace, "logs", pod, check=False)
        raise AssertionError(f"{failure}\n{pod} log:\n{log.stdout}{log.stderr}") from None


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
    # endpoint runs from inside the cluster, by a Service's DNS name. The Service has no selector: its
    # EndpointSlice names a server outside the cluster's pods (the node's registry), as a Service in
    # front of an external model server would. (Not the router's own Service: the router's
    # NetworkPolicy, enforced on this node, admits only the ingress controller and Prometheus.)
    core = client.CoreV1Api(cluster.api)
    core.create_namespaced_service(
        namespace,
        {"metadata": {"name": "upstream"}, "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 5000}]}},
    )
    client.DiscoveryV1Api(cluster.api).create_namespaced_endpoint_slice(namespace, {
        "metadata": {"name": "upstream-1", "labels": {"kubernetes.io/service-name": "upstream"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": int(NETWORK["registry_port"])}],
        "endpoints": [{"addresses": [BRIDGE_ADDRESS]}]})  # fmt: skip
    endpoint = f"http://upstream.{namespace}.svc"
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
    admin = api_key(release, "admin-key")  # /health's detail is the admin's
    url = node_port_url(release)

    def listed() -> bool:
        status, body = get_json(f"{url}/v1/models", key)
        return status == 200 and "echo" in [m["id"] for m in body["data"]]

    wait_for(listed, "the router pods to list the model discovered in the cluster", timeout=60)

    def probed_reachable() -> bool:
        # Both routers' background probers have reached the model's endpoint (the NodePort spreads asks).
        answers = [get_json(f"{url}/health", admin) for _ in range(6)]
        return all(body["backends"].get("echo", {}).get("reachable") is True for _, body in answers)

    wait_for(probed_reachable, "the routers' probers to reach the model's endpoint", timeout=60)

    # `helm test`: a pod inside the cluster resolves the router's Service name and checks its health.
    # Its assertions (discovery synced, Redis reachable) fail the pod, and so `helm test`; the pod is
    # deleted once it succeeds (hook-succeeded), so there are no logs to read afterwards.
    out = helm_test(release, cluster)
    assert "Phase:          Succeeded" in out, out

    # And it can fail: with Redis gone, the routers say so in /health, and `helm test` fails on it.
    apps = client.AppsV1Api(cluster.api)
    redis_name = f"{release.fullname}-redis"

    def redis_seen(available: bool) -> bool:
        # The NodePort spreads requests over both routers: ask until each has answered the same.
        answers = [get_json(f"{url}/health", admin) for _ in range(6)]
        return all(status == 200 and body["redis"]["available"] is available for status, body in answers)

    apps.patch_namespaced_deployment_scale(redis_name, namespace, {"spec": {"replicas": 0}})
    wait_for(lambda: not release.pods("redis") and redis_seen(False), "the routers to lose Redis", timeout=ROLLOUT)
    # (the pod's log ends with the failed assertion's value: body["redis"])
    with pytest.raises(AssertionError, match=r"AssertionError: \{.available.: False\}"):
        helm_test(release, cluster)
    apps.patch_namespaced_deployment_scale(redis_name, namespace, {"spec": {"replicas": 1}})
    wait_for(lambda: redis_seen(True), "the routers to reach Redis again", timeout=ROLLOUT)
    out = helm_test(release, cluster)
    assert "Phase:          Succeeded" in out, out


def listing_models(url: str, key: str) -> Callable[[], str | None]:
    def list_models() -> str | None:
        status, body = get_json(f"{url}/v1/models", key, timeout=10)
        return None if status == 200 else f"{status}: {body}"

    return list_models


def test_upgrade_rolls_the_router_without_a_failed_request(release: Release, cluster: Cluster) -> None:
    key = api_key(release)
    before = {pod.metadata.name for pod in release.pods("router")}
    keys_before = cluster.kubectl("-n", release.namespace, "get", "secret", f"{release.fullname}-api-keys",
                                  "-o", "jsonpath={.data}").stdout  # fmt: skip
    with RequestLoop(listing_models(node_port_url(release), key)) as loop:
        wait_for(lambda: loop.answered >= 5, "the request loop to get its first answers", timeout=60)
        release.run("upgrade", release.name, str(CHART), "--reuse-values", "--set", "router.defaultMaxTokens=128",
                    "--wait", "--timeout", f"{ROLLOUT}s")  # fmt: skip
        wait_for(lambda: not before & {p.metadata.name for p in release.pods("router")},
                 "the old router pods to be gone", timeout=ROLLOUT)  # fmt: skip
        answered_after_rollout = loop.answered
        wait_for(lambda: loop.answered >= answered_after_rollout + 5 or len(loop.failures) > 5,
                 "answers from the new router pods", timeout=60)  # fmt: skip
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


def test_the_standby_operator_takes_over_when_the_active_one_is_killed(release: Release, cluster: Cluster) -> None:
    """The active operator (priority 100) is killed without a goodbye, and its replacement cannot start (the
    node is cordoned): the standby (99) must notice the silent peer and reconcile a change made right after."""
    namespace = release.namespace
    core = client.CoreV1Api(cluster.api)
    custom = client.CustomObjectsApi(cluster.api)
    active, standby = (f"{release.fullname}-operator-{ordinal}" for ordinal in (0, 1))
    old_uid = core.read_namespaced_pod(active, namespace).metadata.uid
    standby_log_before = cluster.kubectl("-n", namespace, "logs", standby).stdout
    cluster.kubectl("cordon", NODE_NAME)
    try:
        killed = time.monotonic()
        core.delete_namespaced_pod(active, namespace, grace_period_seconds=0)
        change = {"spec": {"serving": {"maxInFlightPerReplica": 3}}}
        changed = custom.patch_namespaced_custom_object("modelfleet.io", "v1alpha1", namespace, "inferencemodels",
                                                        "echo", change)  # fmt: skip
        generation = changed["metadata"]["generation"]

        def reconciled() -> bool:
            found = custom.get_namespaced_custom_object("modelfleet.io", "v1alpha1", namespace, "inferencemodels",
                                                        "echo")  # fmt: skip
            return (found.get("status") or {}).get("observedGeneration") == generation

        wait_for(reconciled, "the standby operator to reconcile the change", timeout=ROLLOUT)
        took_over = time.monotonic() - killed
        # Nobody else could have: the active one's replacement is still waiting for the cordoned node.
        replacement = core.read_namespaced_pod(active, namespace)
        assert replacement.metadata.uid != old_uid
        assert replacement.status.phase == "Pending", replacement.status
        standby_log = cluster.kubectl("-n", namespace, "logs", standby).stdout
        assert f"[{namespace}/echo]" not in standby_log_before, standby_log_before[-2000:]
        assert f"[{namespace}/echo]" in standby_log, standby_log[-3000:]
        assert "[ERROR" not in standby_log, standby_log[-3000:]
    finally:
        cluster.kubectl("uncordon", NODE_NAME)
    print(f"\noperator takeover: the standby reconciled a change {took_over:.1f}s after the active one was killed")

    def active_again() -> bool:
        pod = core.read_namespaced_pod(active, namespace)
        return pod.status.phase == "Running" and all(status.ready for status in pod.status.container_statuses or [])

    wait_for(active_again, "the active operator's replacement to run", timeout=ROLLOUT)


def test_uninstall_leaves_nothing_but_the_crds_and_the_kept_key_secret(release: Release, cluster: Cluster) -> None:
    namespace = release.namespace
    # As docs/chart.md says: models first, so that the operator releases their finalizer.
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
