"""The operator on the local cluster, running as its own ServiceAccount: samples, shortage, drift, scale, delete."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from modelfleet.api import v1alpha1
from tests.e2e.conftest import Cluster, OperatorProcess, client_with_token, wait_for

pytestmark = pytest.mark.e2e

SAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "samples"


def custom(cluster: Cluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api)


def get_model(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    body: dict[str, Any] = custom(cluster).get_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, name
    )
    return body


def condition(cluster: Cluster, namespace: str, name: str, kind: str) -> dict[str, Any]:
    conditions = (get_model(cluster, namespace, name).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), {})


def create_model(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> None:
    custom(cluster).create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, manifest
    )


def sample(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((SAMPLES / name).read_text())
    return document


def wait_ready(cluster: Cluster, namespace: str, name: str) -> None:
    cluster.kubectl("wait", "--for=condition=Ready", f"inferencemodels.modelfleet.io/{name}", "-n", namespace,
                    "--timeout=90s")  # fmt: skip


def apply_sample_and_wait_ready(cluster: Cluster, namespace: str, sample_file: str, name: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(SAMPLES / sample_file))
    wait_ready(cluster, namespace, name)


def test_samples_reconcile_into_the_right_children(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    http_endpoint: str,
) -> None:
    external = sample("external-endpoint.yaml")
    external["spec"]["endpoint"]["url"] = http_endpoint  # the operator probes it from this machine
    for name in ("ollama-gpu.yaml", "vllm-awq.yaml", "autoscaled.yaml"):
        cluster.kubectl("apply", "-n", namespace, "-f", str(SAMPLES / name))
    create_model(cluster, namespace, external)
    for name in ("llama3-2-1b", "qwen2-5-7b-awq", "phi3-mini-autoscaled", "gemma3-270m"):
        wait_ready(cluster, namespace, name)

    apps = client.AppsV1Api(cluster.api)
    core = client.CoreV1Api(cluster.api)
    llama = apps.read_namespaced_deployment("im-llama3-2-1b", namespace)
    container = llama.spec.template.spec.containers[0]
    assert container.image == "docker.io/ollama/ollama:0.17.4"
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert {e.name: e.value for e in container.env}["OLLAMA_NUM_PARALLEL"] == "4"
    assert llama.spec.strategy.rolling_update.max_surge == 0
    assert llama.metadata.owner_references[0].kind == "InferenceModel"
    pods = core.list_namespaced_pod(
        namespace, label_selector="modelfleet.io/model=llama3-2-1b,app.kubernetes.io/component=model-server"
    )
    assert pods.items[0].spec.node_name.startswith("gpu-node-")

    qwen = apps.read_namespaced_deployment("im-qwen2-5-7b-awq", namespace).spec.template.spec.containers[0]
    assert qwen.args[:4] == [
        "--model",
        "Qwen/Qwen2.5-7B-Instruct-AWQ",
        "--served-model-name",
        "Qwen/Qwen2.5-7B-Instruct-AWQ",
    ]
    assert qwen.args[-6:] == ["--quantization", "awq", "--max-model-len", "8192", "--gpu-memory-utilization", "0.90"]

    hpa = client.AutoscalingV2Api(cluster.api).read_namespaced_horizontal_pod_autoscaler(
        "im-phi3-mini-autoscaled", namespace
    )
    assert hpa.spec.metrics[0].external.metric.name == "modelfleet_queue_depth"
    assert client.PolicyV1Api(cluster.api).read_namespaced_pod_disruption_budget("im-phi3-mini-autoscaled", namespace)
    managed = apps.read_namespaced_deployment("im-phi3-mini-autoscaled", namespace).metadata.managed_fields
    ours = [m for m in managed if m.manager == "modelfleet-operator"]
    assert ours
    assert all("f:replicas" not in (m.fields_v1.get("f:spec") or {}) for m in ours), "the HPA owns replicas"

    timings = get_model(cluster, namespace, "llama3-2-1b")["status"]["timings"]
    assert {"downloadSeconds", "scheduleSeconds", "loadSeconds"} <= set(timings), timings

    claim = core.read_namespaced_persistent_volume_claim("im-llama3-2-1b-cache", namespace)
    assert claim.status.phase == "Bound"
    assert claim.spec.resources.requests["storage"] == "10Gi"
    assert not apps.list_namespaced_deployment(namespace, label_selector="modelfleet.io/model=gemma3-270m").items
    assert get_model(cluster, namespace, "gemma3-270m")["status"]["endpoint"] == http_endpoint

    table = cluster.kubectl("get", "inferencemodels.modelfleet.io", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "RUNTIME", "MODEL", "READY", "REPLICAS", "ENDPOINT", "AGE"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["llama3-2-1b"][1:6] == [
        "ollama",
        "llama3.2:1b",
        "True",
        "1",
        "http://im-llama3-2-1b." + namespace + ".svc:11434",
    ]


def test_gpu_shortage_is_reported_and_recovers_when_fixed(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
) -> None:
    create_model(cluster, namespace, {
        "apiVersion": "modelfleet.io/v1alpha1", "kind": "InferenceModel", "metadata": {"name": "huge"},
        "spec": {"runtime": "vllm", "model": "org/huge", "resources": {"gpu": 8}},
    })  # fmt: skip
    wait_for(lambda: condition(cluster, namespace, "huge", "Scheduled").get("status") == "False",
             what="Scheduled=False for an 8-GPU model", timeout=90)  # fmt: skip
    scheduled = condition(cluster, namespace, "huge", "Scheduled")
    ready = condition(cluster, namespace, "huge", "Ready")
    assert scheduled["reason"] == "Unschedulable"
    assert "waiting for nvidia.com/gpu: 8 per replica" in scheduled["message"]
    assert ready["status"] == "False"
    assert "nvidia.com/gpu" in ready["message"]
    core = client.CoreV1Api(cluster.api)

    def warned() -> bool:
        events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=huge").items
        return any(e.reason == "Unschedulable" and e.type == "Warning" for e in events)

    # Kopf posts events from a background queue, a moment after the status patch.
    wait_for(warned, what="a Warning event with reason Unschedulable", timeout=30)

    custom(cluster).patch_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, "huge", {"spec": {"resources": {"gpu": 2}}}
    )
    wait_for(lambda: condition(cluster, namespace, "huge", "Ready").get("status") == "True",
             what="Ready=True after lowering the GPU count", timeout=120)  # fmt: skip
    assert (
        condition(cluster, namespace, "huge", "Ready")["observedGeneration"]
        == get_model(cluster, namespace, "huge")["metadata"]["generation"]
    )

    def events() -> list[client.CoreV1Event]:
        return list(core.list_namespaced_event(namespace, field_selector="involvedObject.name=huge").items)

    # Events tell what changed, not that a handler ran: Kopf's own INFO records ("Handler 'create'
    # succeeded.", reason Logging), queued before the Ready=True transition, were never posted.
    wait_for(lambda: any((e.message or "").startswith("Ready=True") for e in events()), what="the Ready=True event",
             timeout=30)  # fmt: skip
    assert [e.message for e in events() if e.reason == "Logging"] == []


def test_drift_is_corrected_and_deleted_children_come_back(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
) -> None:
    apply_sample_and_wait_ready(cluster, namespace, "ollama-gpu.yaml", "llama3-2-1b")
    apps = client.AppsV1Api(cluster.api)
    core = client.CoreV1Api(cluster.api)
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "ollama", "image": "evil/image:latest"}]}}}}
    apps.patch_namespaced_deployment("im-llama3-2-1b", namespace, patch)
    wait_for(
        lambda: (
            apps.read_namespaced_deployment("im-llama3-2-1b", namespace).spec.template.spec.containers[0].image
            == "docker.io/ollama/ollama:0.17.4"
        ),
        what="the hand-edited image to be restored",
        timeout=20,
    )
    core.delete_namespaced_service("im-llama3-2-1b", namespace)
    wait_for(lambda: core.read_namespaced_service("im-llama3-2-1b", namespace) is not None,
             what="the deleted Service to be recreated", timeout=20)  # fmt: skip


def test_a_new_model_or_image_gets_a_new_prefetch_job_and_the_old_one_is_deleted(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
) -> None:
    apply_sample_and_wait_ready(cluster, namespace, "ollama-gpu.yaml", "llama3-2-1b")
    batch, apps = client.BatchV1Api(cluster.api), client.AppsV1Api(cluster.api)
    selector = "modelfleet.io/model=llama3-2-1b,app.kubernetes.io/component=model-prefetch"

    def jobs() -> list[client.V1Job]:
        found: list[client.V1Job] = batch.list_namespaced_job(namespace, label_selector=selector).items
        return found

    def serving(model: str, image: str) -> bool:
        template = apps.read_namespaced_deployment("im-llama3-2-1b", namespace).spec.template
        served = (template.metadata.annotations or {}).get("modelfleet.io/served-model")
        return template.spec.containers[0].image == image and served == model

    (first,) = jobs()
    default_image = first.spec.template.spec.containers[0].image
    changes = [
        ({"model": "llama3.2:3b"}, "llama3.2:3b", default_image),
        ({"image": "docker.io/ollama/ollama:0.17.5"}, "llama3.2:3b", "docker.io/ollama/ollama:0.17.5"),
    ]
    names = [first.metadata.name]
    for change, model, image in changes:
        custom(cluster).patch_namespaced_custom_object(
            v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, "llama3-2-1b", {"spec": change}
        )

        def replaced() -> bool:
            current = jobs()
            return len(current) == 1 and current[0].metadata.name not in names

        wait_for(replaced, what=f"one new prefetch Job, and no other, after {change}", timeout=60)
        (job,) = jobs()
        container = job.spec.template.spec.containers[0]
        assert job.metadata.annotations["modelfleet.io/prefetch-model"] == model
        assert container.image == image
        names.append(job.metadata.name)
        # The pods roll to it once the new Job has completed (kwok completes Jobs).
        wait_for(lambda: serving(model, image), what=f"the Deployment to serve {model} with {image}", timeout=60)  # noqa: B023
    assert len(set(names)) == 3, names


def test_scale_subresource_and_deletion_of_all_children(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
) -> None:
    apply_sample_and_wait_ready(cluster, namespace, "ollama-gpu.yaml", "llama3-2-1b")
    cluster.kubectl("scale", "inferencemodels.modelfleet.io/llama3-2-1b", "--replicas=3", "-n", namespace)
    apps = client.AppsV1Api(cluster.api)
    wait_for(lambda: (apps.read_namespaced_deployment("im-llama3-2-1b", namespace).status.ready_replicas or 0) == 3,
             what="3 ready replicas after kubectl scale", timeout=60)  # fmt: skip
    wait_for(lambda: get_model(cluster, namespace, "llama3-2-1b")["status"].get("readyReplicas") == 3,
             what="status.readyReplicas to follow", timeout=30)  # fmt: skip

    custom(cluster).delete_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, "llama3-2-1b"
    )
    core = client.CoreV1Api(cluster.api)
    selector = "modelfleet.io/model=llama3-2-1b"

    def children_left() -> int:
        return sum(
            len(items)
            for items in (
                apps.list_namespaced_deployment(namespace, label_selector=selector).items,
                core.list_namespaced_service(namespace, label_selector=selector).items,
                core.list_namespaced_persistent_volume_claim(namespace, label_selector=selector).items,
                client.BatchV1Api(cluster.api).list_namespaced_job(namespace, label_selector=selector).items,
                core.list_namespaced_pod(namespace, label_selector=selector).items,
            )
        )

    wait_for(lambda: children_left() == 0, what="every child to be garbage-collected", timeout=60)


def test_an_autoscaled_model_unloads_and_loads_through_the_scale_subresource(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
) -> None:
    """spec.replicas 0 pauses autoscaling: no HPA, no pods.  Above 0 again, the operator gives the replica
    count back (server-side apply drops its field, which returns to the Deployment's default of 1) and the
    HPA, recreated, takes it from there.  What the router's load and unload set is exactly this."""
    apply_sample_and_wait_ready(cluster, namespace, "autoscaled.yaml", "phi3-mini-autoscaled")
    apps = client.AppsV1Api(cluster.api)
    hpas = client.AutoscalingV2Api(cluster.api)

    def hpa_exists() -> bool:
        return any(h.metadata.name == "im-phi3-mini-autoscaled"
                   for h in hpas.list_namespaced_horizontal_pod_autoscaler(namespace).items)  # fmt: skip

    def deployment_replicas() -> int | None:
        replicas: int | None = apps.read_namespaced_deployment("im-phi3-mini-autoscaled", namespace).spec.replicas
        return replicas

    assert hpa_exists()
    cluster.kubectl("scale", "inferencemodels.modelfleet.io/phi3-mini-autoscaled", "--replicas=0", "-n", namespace)
    wait_for(lambda: not hpa_exists() and deployment_replicas() == 0, what="the HPA gone and 0 replicas", timeout=60)
    wait_for(lambda: condition(cluster, namespace, "phi3-mini-autoscaled", "Ready").get("reason") == "Unloaded",
             what="Ready=False Unloaded", timeout=60)  # fmt: skip
    assert get_model(cluster, namespace, "phi3-mini-autoscaled")["status"]["phase"] == "Idle"

    cluster.kubectl("scale", "inferencemodels.modelfleet.io/phi3-mini-autoscaled", "--replicas=1", "-n", namespace)
    wait_for(hpa_exists, what="the HPA back", timeout=60)
    wait_ready(cluster, namespace, "phi3-mini-autoscaled")
    assert (deployment_replicas() or 0) >= 1
    managed = apps.read_namespaced_deployment("im-phi3-mini-autoscaled", namespace).metadata.managed_fields
    owners = [entry.manager for entry in managed if "f:replicas" in str(entry.fields_v1)]
    assert "modelfleet-operator" not in owners, f"the operator still owns spec.replicas: {owners}"


def test_operator_identity_is_limited_and_it_exports_metrics(
    cluster: Cluster,
    operator: OperatorProcess,
) -> None:
    with client_with_token(cluster, operator.token) as api:
        core = client.CoreV1Api(api)
        for forbidden in (lambda: core.list_namespaced_secret("default"), lambda: core.list_node(),
                          lambda: client.RbacAuthorizationV1Api(api).list_cluster_role()):  # fmt: skip
            with pytest.raises(ApiException) as refused:
                forbidden()
            assert refused.value.status == 403
    with urllib.request.urlopen(operator.metrics_url, timeout=5) as response:
        metrics = response.read().decode()
    assert "modelfleet_operator_reconciles_total" in metrics
    assert "modelfleet_operator_reconcile_duration_seconds_bucket" in metrics
