"""The local cluster behaves like a real one: scheduling, GPUs, garbage collection, HPAs, RBAC."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.e2e.conftest import Cluster, client_with_token, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.harness]

GPU_TOLERATION = client.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")


def pause_container(**resources: dict[str, str]) -> client.V1Container:
    return client.V1Container(
        name="main", image="registry.k8s.io/pause:3.10", resources=client.V1ResourceRequirements(**resources)
    )


def gpu_node_names(cluster: Cluster) -> set[str]:
    nodes = client.CoreV1Api(cluster.api).list_node(label_selector="nvidia.com/gpu.present=true").items
    return {node.metadata.name for node in nodes}


def test_three_ready_kwok_nodes_two_with_four_gpus(cluster: Cluster) -> None:
    # The real node (tests/e2e/test_realnode.py) is not a kwok node: it carries no fake annotation.
    nodes = [
        n
        for n in client.CoreV1Api(cluster.api).list_node().items
        if (n.metadata.annotations or {}).get("kwok.x-k8s.io/node") == "fake"
    ]
    ready = {
        n.metadata.name for n in nodes if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions)
    }
    assert len(nodes) == 3
    assert ready == {n.metadata.name for n in nodes}
    gpus = {n.metadata.name: n.status.allocatable.get("nvidia.com/gpu") for n in nodes}
    assert sorted(v for v in gpus.values() if v) == ["4", "4"]
    for node in nodes:
        if gpus[node.metadata.name]:
            assert node.metadata.labels["nvidia.com/gpu.present"] == "true"
            assert [(t.key, t.value, t.effect) for t in node.spec.taints] == [
                ("nvidia.com/gpu", "present", "NoSchedule")
            ]


def test_deployment_pods_are_scheduled_and_become_ready(cluster: Cluster, namespace: str) -> None:
    apps = client.AppsV1Api(cluster.api)
    core = client.CoreV1Api(cluster.api)
    labels = {"app": "web"}
    apps.create_namespaced_deployment(
        namespace,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1DeploymentSpec(
                replicas=2,
                selector=client.V1LabelSelector(match_labels=labels),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=labels),
                    spec=client.V1PodSpec(containers=[pause_container(requests={"cpu": "100m"})]),
                ),
            ),
        ),
    )
    wait_for(
        lambda: (apps.read_namespaced_deployment_status("web", namespace).status.ready_replicas or 0) == 2,
        what="deployment web to have 2 ready replicas",
    )
    pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
    assert len(pods) == 2
    for pod in pods:
        assert pod.status.phase == "Running"
        assert any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions)
        # GPU nodes are tainted, so a pod that does not tolerate the taint can only land on the CPU node.
        assert pod.spec.node_name not in gpu_node_names(cluster)


def test_gpu_pod_lands_on_a_gpu_node(cluster: Cluster, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api)
    core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="gpu-job"),
            spec=client.V1PodSpec(
                containers=[pause_container(limits={"nvidia.com/gpu": "1"})],
                tolerations=[GPU_TOLERATION],
            ),
        ),
    )
    wait_for(lambda: core.read_namespaced_pod("gpu-job", namespace).status.phase == "Running", what="GPU pod Running")
    pod = core.read_namespaced_pod("gpu-job", namespace)
    assert pod.spec.node_name in gpu_node_names(cluster)
    assert pod.spec.containers[0].resources.requests["nvidia.com/gpu"] == "1"


def test_pod_asking_for_100_gpus_stays_pending_with_a_reason(cluster: Cluster, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api)
    core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="greedy"),
            spec=client.V1PodSpec(
                containers=[pause_container(limits={"nvidia.com/gpu": "100"})],
                tolerations=[GPU_TOLERATION],
            ),
        ),
    )

    def failed_scheduling_messages() -> list[str]:
        events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=greedy").items
        return [e.message for e in events if e.reason == "FailedScheduling"]

    wait_for(lambda: bool(failed_scheduling_messages()), what="a FailedScheduling event for the 100-GPU pod")
    assert any("nvidia.com/gpu" in message for message in failed_scheduling_messages()), failed_scheduling_messages()

    def scheduled_condition() -> list[Any]:
        pod = core.read_namespaced_pod("greedy", namespace)
        return [c for c in pod.status.conditions or [] if c.type == "PodScheduled"]

    # The scheduler records the event and writes the pod's condition separately: either may land first.
    wait_for(lambda: bool(scheduled_condition()), what="the PodScheduled condition of the 100-GPU pod", timeout=30)
    pod = core.read_namespaced_pod("greedy", namespace)
    assert pod.status.phase == "Pending"
    assert pod.spec.node_name is None
    scheduled = scheduled_condition()
    assert scheduled[0].status == "False"
    assert scheduled[0].reason == "Unschedulable"


def test_deleting_a_deployment_collects_its_replicaset_and_pods(cluster: Cluster, namespace: str) -> None:
    apps = client.AppsV1Api(cluster.api)
    core = client.CoreV1Api(cluster.api)
    labels = {"app": "doomed"}
    apps.create_namespaced_deployment(
        namespace,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="doomed"),
            spec=client.V1DeploymentSpec(
                replicas=2,
                selector=client.V1LabelSelector(match_labels=labels),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=labels), spec=client.V1PodSpec(containers=[pause_container()])
                ),
            ),
        ),
    )
    wait_for(
        lambda: len(core.list_namespaced_pod(namespace, label_selector="app=doomed").items) == 2,
        what="the deployment's 2 pods",
    )
    assert len(apps.list_namespaced_replica_set(namespace, label_selector="app=doomed").items) == 1

    apps.delete_namespaced_deployment("doomed", namespace, propagation_policy="Background")
    wait_for(
        lambda: (
            not apps.list_namespaced_replica_set(namespace, label_selector="app=doomed").items
            and not core.list_namespaced_pod(namespace, label_selector="app=doomed").items
        ),
        what="the garbage collector to remove the ReplicaSet and its pods",
    )


def test_hpa_with_an_external_metric_is_accepted_and_evaluated(cluster: Cluster, namespace: str) -> None:
    autoscaling = client.AutoscalingV2Api(cluster.api)
    apps = client.AppsV1Api(cluster.api)
    labels = {"app": "scaled"}
    apps.create_namespaced_deployment(
        namespace,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="scaled"),
            spec=client.V1DeploymentSpec(
                replicas=1,
                selector=client.V1LabelSelector(match_labels=labels),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=labels), spec=client.V1PodSpec(containers=[pause_container()])
                ),
            ),
        ),
    )
    metric = client.V2ExternalMetricSource(
        metric=client.V2MetricIdentifier(
            name="modelfleet_queue_depth",
            selector=client.V1LabelSelector(match_labels={"model": "scaled"}),
        ),
        target=client.V2MetricTarget(type="AverageValue", average_value="4"),
    )
    autoscaling.create_namespaced_horizontal_pod_autoscaler(
        namespace,
        client.V2HorizontalPodAutoscaler(
            metadata=client.V1ObjectMeta(name="scaled"),
            spec=client.V2HorizontalPodAutoscalerSpec(
                scale_target_ref=client.V2CrossVersionObjectReference(
                    api_version="apps/v1", kind="Deployment", name="scaled"
                ),
                min_replicas=1,
                max_replicas=5,
                metrics=[client.V2MetricSpec(type="External", external=metric)],
            ),
        ),
    )
    stored = autoscaling.read_namespaced_horizontal_pod_autoscaler("scaled", namespace)
    assert stored.spec.metrics[0].external.metric.name == "modelfleet_queue_depth"

    # The controller-manager's HPA controller really evaluates it: it asks prometheus-adapter
    # (hack/monitoring.sh), which has no series for a model that no router serves, and reports that
    # it cannot fetch the metric. (tests/e2e/test_autoscaling.py has the metric really served.)
    def scaling_active_condition() -> client.V2HorizontalPodAutoscalerCondition | None:
        hpa = autoscaling.read_namespaced_horizontal_pod_autoscaler_status("scaled", namespace)
        return next((c for c in hpa.status.conditions or [] if c.type == "ScalingActive"), None)

    wait_for(lambda: scaling_active_condition() is not None, what="the HPA controller to evaluate the HPA", timeout=90)
    condition = scaling_active_condition()
    assert condition is not None
    assert condition.status == "False"
    assert condition.reason == "FailedGetExternalMetric"


def test_service_account_with_a_narrow_role_is_denied_the_rest(cluster: Cluster, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api)
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="reader"))
    )
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="pod-reader"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="reader-reads-pods"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)],
        ),
    )
    # A real bound token from the TokenRequest API, used as a bearer token: the API server
    # authenticates it and RBAC authorizes each request.
    token = core.create_namespaced_service_account_token(
        "reader", namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(expiration_seconds=600))
    ).status.token
    with client_with_token(cluster, token) as reader_api:
        reader = client.CoreV1Api(reader_api)
        wait_for(
            lambda: reader.list_namespaced_pod(namespace) is not None, what="the RoleBinding to take effect", timeout=30
        )

        denied = []
        for attempt in (
            lambda: reader.list_namespaced_secret(namespace),
            lambda: reader.list_namespaced_pod("kube-system"),
            lambda: reader.create_namespaced_pod(
                namespace,
                client.V1Pod(
                    metadata=client.V1ObjectMeta(name="x"), spec=client.V1PodSpec(containers=[pause_container()])
                ),
            ),
            lambda: reader.delete_namespace(namespace),
        ):
            with pytest.raises(ApiException) as refused:
                attempt()
            denied.append(refused.value.status)
            assert "forbidden" in json.loads(refused.value.body)["message"]
        assert denied == [403, 403, 403, 403]
