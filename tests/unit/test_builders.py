"""Invariants of the pure builders, over every runtime and option combination."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, cast

import pytest
from kubernetes.client.exceptions import ApiException

from modelfleet.api import v1alpha1
from modelfleet.api.naming import MODEL_LABEL
from modelfleet.operator.builders import autoscaling, cache, networkpolicy, service, workload
from modelfleet.operator.builders.common import ModelContext, NetworkPeers, RuntimeImages, selector_labels
from modelfleet.operator.kube import Kube, apply_body
from modelfleet.operator.reconcile import namespace_terminating, probe_endpoint, reconcile
from modelfleet.operator.settings import OperatorSettings
from modelfleet.operator.status import MAX_MESSAGE_LENGTH, Observed, conditions_for, phase_for
from tests.support.models import COMBINATIONS, OWNER, all_children, make_context

pytestmark = pytest.mark.unit


@pytest.fixture(params=COMBINATIONS, ids=["-".join(map(str, c)) for c in COMBINATIONS])
def context(request: pytest.FixtureRequest) -> ModelContext:
    return make_context(*request.param)


def test_every_child_is_owned_labelled_and_namespaced(context: ModelContext) -> None:
    for child in all_children(context):
        meta = child["metadata"]
        assert meta["namespace"] == "models"
        assert meta["labels"][MODEL_LABEL] == "demo"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "modelfleet-operator"
        (owner,) = meta["ownerReferences"]
        assert owner == OWNER


def test_builders_are_deterministic_and_leave_the_input_alone(context: ModelContext) -> None:
    before = context.spec.model_dump()
    assert all_children(context) == all_children(context)
    assert context.spec.model_dump() == before


def test_gpu_requests_tolerations_and_node_selector(context: ModelContext) -> None:
    pod = workload.build_deployment(context)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    gpus = context.resources.gpu
    if gpus:
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    else:
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
        assert "tolerations" not in pod
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "24Gi"}
    assert container["resources"]["limits"]["memory"] == "24Gi"


def test_rollouts_never_need_a_spare_gpu(context: ModelContext) -> None:
    strategy = workload.build_deployment(context)["spec"]["strategy"]["rollingUpdate"]
    if context.uses_gpu:
        assert strategy == {"maxSurge": 0, "maxUnavailable": 1}
    else:
        assert strategy["maxUnavailable"] == 0


def test_hpa_owns_replicas_when_autoscaling(context: ModelContext) -> None:
    deployment = workload.build_deployment(context)
    hpa = autoscaling.build_hpa(context)
    if context.autoscaling.enabled:
        assert "replicas" not in deployment["spec"]
        assert hpa is not None
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        # Asked for 0: the router's metric can bring a model back from zero, an engine's cannot.
        assert hpa["spec"]["minReplicas"] == (0 if context.autoscaling.metric == "router" else 1)
        assert autoscaling.build_hpa(context, scale_to_zero=False)["spec"]["minReplicas"] == 1  # type: ignore[index]
        assert hpa["spec"]["maxReplicas"] == 5
        (metric,) = hpa["spec"]["metrics"]
        if context.autoscaling.metric == "router":
            assert metric["type"] == "External"
            assert metric["external"]["metric"]["name"] == "modelfleet_queue_depth"
            assert metric["external"]["metric"]["selector"]["matchLabels"]["model"] == "demo"
        else:
            assert metric["type"] == "Pods"
            assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
        scale_down = hpa["spec"]["behavior"]["scaleDown"]
        assert scale_down["stabilizationWindowSeconds"] == context.autoscaling.scale_down_stabilization_seconds
        tuned = context.spec.model_copy(update={"autoscaling": context.autoscaling.model_copy(
            update={"scale_down_stabilization_seconds": 42})})  # fmt: skip
        tuned_hpa = autoscaling.build_hpa(dataclasses.replace(context, spec=tuned))
        assert tuned_hpa is not None
        assert tuned_hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 42
    else:
        assert deployment["spec"]["replicas"] == context.spec.replicas
        assert hpa is None


def test_service_selects_the_pods_on_the_named_port(context: ModelContext) -> None:
    deployment = workload.build_deployment(context)
    svc = service.build_service(context)
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= template_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"] == selector_labels(context)
    (port,) = svc["spec"]["ports"]
    container_port = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]
    assert port["targetPort"] == container_port["name"] == "http"
    assert port["port"] == container_port["containerPort"] == (11434 if context.runtime == "ollama" else 8000)
    assert service.service_url(context).endswith(f"im-demo.models.svc:{port['port']}")


def test_cache_claim_is_mounted_and_colocated_when_read_write_once(context: ModelContext) -> None:
    deployment = workload.build_deployment(context)
    claim = cache.build_cache_claim(context)
    pod = deployment["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    if context.cache.existing_claim:
        assert claim is None
        assert volume["persistentVolumeClaim"]["claimName"] == "shared-weights"
    else:
        assert claim is not None
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert claim["spec"]["accessModes"] == [context.cache.access_mode]
        assert claim["spec"]["resources"]["requests"]["storage"] == "30Gi"
    colocated = "podAffinity" in pod.get("affinity", {})
    assert colocated == (context.cache.access_mode == "ReadWriteOnce")
    # The replica count never changes the pod template: scaling up must not replace running pods.
    if not context.autoscaling.enabled:
        scaled = dataclasses.replace(context, spec=context.spec.model_copy(update={"replicas": 7}))
        assert workload.build_deployment(scaled)["spec"]["template"] == deployment["spec"]["template"]


def test_prefetch_job_fetches_on_the_serving_nodes_without_a_gpu(context: ModelContext) -> None:
    job = cache.build_prefetch_job(context)
    assert job is not None
    pod = job["spec"]["template"]["spec"]
    serving_pod = workload.build_deployment(context)["spec"]["template"]["spec"]
    assert pod.get("nodeSelector") == serving_pod.get("nodeSelector")
    assert pod.get("tolerations") == serving_pod.get("tolerations")
    assert "limits" not in pod["containers"][0]["resources"]
    # The Job fetches with the serving image: the same Ollama writes the layout the pods will read.
    assert pod["containers"][0]["image"] == serving_pod["containers"][0]["image"] == context.image
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["MODELFLEET_MODEL"] == context.spec.model
    mount = pod["containers"][0]["volumeMounts"][0]
    assert (mount["name"], mount["mountPath"]) == ("model-cache", "/models")


def test_runtime_specific_arguments(context: ModelContext) -> None:
    # The operator's configured image for the runtime (its settings), not a default baked in here.
    images = RuntimeImages(
        ollama="registry.local/ollama:test", vllm="registry.local/vllm:test", vllm_cpu="registry.local/vllm-cpu:test"
    )
    container = workload.build_deployment(dataclasses.replace(context, images=images))["spec"]["template"]["spec"][
        "containers"
    ][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["EXTRA"] == "1"
    if context.runtime == "ollama":
        assert container["image"] == images.ollama
    else:
        # The official vLLM image is CUDA-only: a model without a GPU gets the CPU build.
        assert container["image"] == (images.vllm if context.uses_gpu else images.vllm_cpu)
        assert ("VLLM_CPU_KVCACHE_SPACE" in env) == (not context.uses_gpu)
    if context.runtime == "ollama":
        assert container["args"] == ["serve"]
        assert env["OLLAMA_NUM_PARALLEL"] == "6"
        assert env["OLLAMA_KEEP_ALIVE"] == "-1"
        assert env["OLLAMA_MODELS"] == "/models/ollama"
    else:
        args = container["args"]
        assert args[:4] == ["--model", context.spec.model, "--served-model-name", context.spec.model]
        assert args[-2:] == ["--quantization", "awq"], "user engine args come last, so they win"
        assert ("--tensor-parallel-size" in args) == (context.resources.gpu > 1)
        assert env["HF_HUB_OFFLINE"] == "1", "serving pods must never download weights"


def test_probes_never_run_the_model_and_pods_run_as_non_root(context: ModelContext) -> None:
    pod = workload.build_deployment(context)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in {"/api/version", "/health"}
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 1800
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_pdb_only_with_more_than_one_replica(context: ModelContext) -> None:
    pdb = autoscaling.build_pdb(context)
    assert (pdb is not None) == (workload.max_replicas(context) > 1)


def test_image_override_and_prefetch_job_name_follow_the_model() -> None:
    base = make_context("ollama", 1, "fixed-1", "rwo")
    overridden = ModelContext(
        name="demo",
        namespace="models",
        uid="u",
        spec=base.spec.model_copy(update={"image": "registry.local/ollama:custom"}),
    )
    assert workload.build_deployment(overridden)["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "registry.local/ollama:custom"
    )
    other_model = ModelContext(
        name="demo", namespace="models", uid="u", spec=base.spec.model_copy(update={"model": "x"})
    )
    assert cache.prefetch_job_name(base) != cache.prefetch_job_name(other_model)
    assert cache.prefetch_job_name(base) == cache.prefetch_job_name(make_context("ollama", 2, "router", "rwx"))


def test_endpoint_models_have_no_workload() -> None:
    endpoint = ModelContext(
        name="ext",
        namespace="models",
        uid="u",
        spec=v1alpha1.InferenceModelSpec.model_validate({"model": "m", "endpoint": {"url": "http://127.0.0.1:1"}}),
    )
    with pytest.raises(ValueError, match="endpoint model"):
        workload.build_deployment(endpoint)


# The per-model NetworkPolicy ------------------------------------------------------------------

PEERS = NetworkPeers(
    router_namespace="gateway",
    router_pod_labels={"app.kubernetes.io/instance": "mf", "app.kubernetes.io/component": "router"},
    operator_pod_labels={"app.kubernetes.io/instance": "mf", "app.kubernetes.io/component": "operator"},
    monitoring_namespace_labels={"kubernetes.io/metadata.name": "monitoring"},
    monitoring_pod_labels={"app.kubernetes.io/name": "prometheus"},
)


def with_peers(context: ModelContext, peers: NetworkPeers | None = PEERS) -> ModelContext:
    return dataclasses.replace(context, network=peers)


def matches(selector: dict[str, Any], pod_labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "the policies use matchLabels only"
    return bool(selector["matchLabels"].items() <= pod_labels.items())


def test_network_policy_admits_only_the_router_and_operator_to_every_pod_of_the_model(context: ModelContext) -> None:
    context = with_peers(context)
    policy = networkpolicy.build_network_policy(context)
    assert policy is not None
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    meta = policy["metadata"]
    assert (meta["name"], meta["namespace"], meta["labels"][MODEL_LABEL]) == ("im-demo", "models", "demo")
    assert meta["ownerReferences"][0]["uid"] == "1234-uid"
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"], "egress stays open: prefetch Jobs download weights"
    # It selects the serving pods and the prefetch pods, and no other model's pods.
    pods = [workload.build_deployment(context)["spec"]["template"]["metadata"]["labels"]]
    job = cache.build_prefetch_job(context)
    if job is not None:
        pods.append(job["spec"]["template"]["metadata"]["labels"])
    assert all(matches(spec["podSelector"], labels) for labels in pods)
    other = with_peers(ModelContext(name="other", namespace="models", uid="u", spec=context.spec))
    assert not matches(spec["podSelector"], workload.build_deployment(other)["spec"]["template"]["metadata"]["labels"])
    # One rule: the serving port, from the router's and the operator's pods in the release's namespace
    # (the operator sends the warm-up), and Prometheus for vLLM.
    (rule,) = spec["ingress"]
    container = workload.build_deployment(context)["spec"]["template"]["spec"]["containers"][0]
    assert rule["ports"] == [{"protocol": "TCP", "port": container["ports"][0]["containerPort"]}]
    router = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/instance": "mf", "app.kubernetes.io/component": "router"}},
    }
    operator = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/instance": "mf", "app.kubernetes.io/component": "operator"}},
    }
    prometheus = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    # Both selectors in one peer (AND): never a bare namespaceSelector or podSelector, which would admit more.
    assert rule["from"] == ([router, operator, prometheus] if context.runtime == "vllm" else [router, operator])


def test_network_policy_is_optional_and_prometheus_only_when_configured() -> None:
    base = make_context("vllm", 1, "engine", "rwo")
    assert networkpolicy.build_network_policy(base) is None, "no peers configured: no policy"
    no_monitoring = dataclasses.replace(PEERS, monitoring_namespace_labels={})
    policy = networkpolicy.build_network_policy(with_peers(base, no_monitoring))
    assert policy is not None
    (rule,) = policy["spec"]["ingress"]
    assert [peer["namespaceSelector"]["matchLabels"] for peer in rule["from"]] == [
        {"kubernetes.io/metadata.name": "gateway"}
    ] * 2, "the router and the operator, and no Prometheus"
    assert networkpolicy.build_network_policy(with_peers(base)) == networkpolicy.build_network_policy(with_peers(base))


def test_operator_settings_give_the_builder_its_peers() -> None:
    defaults = OperatorSettings().network_peers
    assert defaults is not None
    assert defaults.router_namespace == "modelfleet-system"
    assert defaults.router_pod_labels == {
        "app.kubernetes.io/name": "modelfleet",
        "app.kubernetes.io/component": "router",
    }
    assert OperatorSettings(network_policy=False).network_peers is None
    chart_style = OperatorSettings.model_validate(
        {"router_namespace": "gateway", "router_pod_labels": PEERS.router_pod_labels, "monitoring_namespace_labels": {}}
    ).network_peers
    assert chart_style is not None
    assert (chart_style.router_namespace, chart_style.monitoring_namespace_labels) == ("gateway", {})


# Found by fuzzing InferenceModels through the API server (tests/e2e/test_inferencemodel_fuzz.py).


def fuzzed_context(name: str = "demo", **spec: object) -> ModelContext:
    body = {"runtime": "ollama", "model": "phi3:mini", **spec}
    return ModelContext(
        name=name, namespace="models", uid="1234-uid", spec=v1alpha1.InferenceModelSpec.model_validate(body)
    )


def test_prefetch_job_name_fits_a_label_value_for_the_longest_model_name() -> None:
    longest = "m" * v1alpha1.MAX_NAME_LENGTH
    job_name = cache.prefetch_job_name(fuzzed_context(longest))
    twin_name = cache.prefetch_job_name(fuzzed_context(longest[:-1] + "n"))
    assert len(job_name) <= 63
    assert len(twin_name) <= 63
    assert job_name != twin_name, "two long names sharing a prefix still get their own Job"
    assert job_name.endswith("-prefetch-" + cache.prefetch_key(fuzzed_context(longest)))
    # Short names keep the name they always had.
    assert cache.prefetch_job_name(fuzzed_context("demo")).startswith("im-demo-prefetch-")


def test_engine_env_replaces_the_operators_variable_of_the_same_name() -> None:
    context = fuzzed_context(engine={"env": [{"name": "OLLAMA_KEEP_ALIVE", "value": "5m"}, {"name": "X", "value": ""}]})
    env = workload.build_deployment(context)["spec"]["template"]["spec"]["containers"][0]["env"]
    names = [var["name"] for var in env]
    assert len(names) == len(set(names)), "server-side apply refuses an env list naming a variable twice"
    assert {"name": "OLLAMA_KEEP_ALIVE", "value": "5m"} in env
    assert "OLLAMA_HOST" in names


def test_typed_tolerations_reach_the_pods_in_camel_case() -> None:
    toleration = {"key": "example.com/t", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}
    context = fuzzed_context(scheduling={"tolerations": [toleration]}, resources={"gpu": 0})
    pod = workload.build_deployment(context)["spec"]["template"]["spec"]
    assert pod["tolerations"] == [toleration]
    job_pod = cache.build_prefetch_job(context)
    assert job_pod is not None
    assert job_pod["spec"]["template"]["spec"]["tolerations"] == [toleration]


def test_apply_body_is_yaml_safe_for_every_character() -> None:
    """The apply content type is read as YAML, which refuses JSON's surrogate-pair escapes and raw DEL/C1."""
    value = "🦙 \x7f \x85 \u2028 é \n \\ud83e"
    body = apply_body({"model": value})
    assert "🦙".encode() in body
    assert b"\\ud83e\\udd99" not in body
    assert b"\x7f" not in body
    assert b"\\u007f" in body
    assert b"\\u2028" in body
    assert json.loads(body) == {"model": value}


@pytest.mark.parametrize("url", ["http://host:99999", "http://a..b/", "http://[::1"])
def test_an_unusable_endpoint_url_is_unreachable_not_a_crash(url: str) -> None:
    reachable, error = probe_endpoint(url, timeout=0.5)
    assert not reachable
    assert error


def test_a_refused_child_is_a_failed_condition_not_a_retry_loop() -> None:
    states = conditions_for(Observed(rejected="the API server refused a child: " + "x" * 5000))
    ready = next(state for state in states if state.type == "Ready")
    assert (ready.status, ready.reason) == ("False", "InvalidSpec")
    assert len(ready.message) <= MAX_MESSAGE_LENGTH
    assert phase_for(states) == "Failed"


class EmptyNamespaceKube:
    """A Kube in which nothing exists yet: reads find nothing, deletes delete nothing."""

    def get(self, *_: object) -> None:
        return None

    def list(self, *_: object) -> list[object]:
        return []

    def delete(self, *_: object) -> bool:
        return False


class RefusingKube(EmptyNamespaceKube):
    """A Kube whose applies the API server answers with one status."""

    def __init__(self, status: int) -> None:
        self.status = status

    def apply(self, manifest: dict[str, object]) -> dict[str, object]:
        error = ApiException(status=self.status, reason="refused")
        error.body = json.dumps({"message": f"{manifest['kind']} is invalid: spec.template.spec.affinity: bad"})
        raise error


MODEL_BODY = {
    "metadata": {"name": "demo", "namespace": "models", "uid": "1234-uid", "generation": 3},
    "spec": {"runtime": "ollama", "model": "phi3:mini"},
}


def test_reconcile_reports_an_invalid_child_and_retries_anything_else() -> None:
    outcome = reconcile(cast(Kube, RefusingKube(422)), MODEL_BODY, RuntimeImages())
    ready = next(c for c in outcome.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec"
    assert "spec.template.spec.affinity" in ready["message"]
    assert outcome.status["observedGeneration"] == 3
    assert outcome.status["phase"] == "Failed"
    with pytest.raises(ApiException):
        reconcile(cast(Kube, RefusingKube(500)), MODEL_BODY, RuntimeImages())


def test_a_spec_the_typed_model_refuses_is_reported_with_its_field() -> None:
    body = {**MODEL_BODY, "spec": {"runtime": "ollama", "model": "m", "replicas": -1}}
    outcome = reconcile(cast(Kube, RefusingKube(500)), body, RuntimeImages())
    ready = next(c for c in outcome.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec"
    assert "spec.replicas" in ready["message"]


def test_zero_replicas_is_not_loading() -> None:
    deployment = {"spec": {"replicas": 0}, "status": {}}
    states = conditions_for(Observed(deployment=deployment, prefetch_expected=False))
    ready = next(state for state in states if state.type == "Ready")
    assert ready.reason == "ScaledToZero"
    assert phase_for(states) == "Idle"


class NoScaleToZeroKube(EmptyNamespaceKube):
    """An API server before Kubernetes 1.37: it refuses an HPA with minReplicas 0, as 1.36 does.

    A fake because the local cluster runs 1.37, where the HPAScaleToZero feature is on.
    """

    def __init__(self) -> None:
        self.applied: list[dict[str, Any]] = []

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        if manifest["kind"] == "HorizontalPodAutoscaler" and manifest["spec"]["minReplicas"] == 0:
            error = ApiException(status=422, reason="Unprocessable Entity")
            name = manifest["metadata"]["name"]
            error.body = json.dumps(
                {
                    "message": f'HorizontalPodAutoscaler.autoscaling "{name}" is invalid: '
                    "spec.minReplicas: Invalid value: 0: must be greater than or equal to 1"
                }
            )
            raise error
        self.applied.append(manifest)
        if manifest["kind"] == "Job":
            return {**manifest, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
        return manifest


def test_an_api_server_without_scale_to_zero_keeps_one_replica_and_says_why() -> None:
    body = {
        **MODEL_BODY,
        "spec": {"runtime": "ollama", "model": "phi3:mini", "autoscaling": {"enabled": True, "minReplicas": 0}},
    }
    kube = NoScaleToZeroKube()
    outcome = reconcile(cast(Kube, kube), body, RuntimeImages())
    (hpa,) = [m for m in kube.applied if m["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["minReplicas"] == 1
    conditions = {c["type"]: c for c in outcome.status["conditions"]}
    assert conditions["ScaleToZero"]["status"] == "False"
    assert "Kubernetes 1.37" in conditions["ScaleToZero"]["message"]
    assert "must be greater than or equal to 1" in conditions["ScaleToZero"]["message"]
    assert outcome.status["phase"] != "Failed"


def test_a_terminating_namespace_is_recognised_by_the_cause_not_the_status() -> None:
    terminating = ApiException(status=403, reason="Forbidden")
    terminating.body = json.dumps({"details": {"causes": [{"reason": "NamespaceTerminating"}]}})
    rbac = ApiException(status=403, reason="Forbidden")
    rbac.body = json.dumps({"message": "deployments.apps is forbidden: User cannot create"})
    assert namespace_terminating(terminating)
    assert not namespace_terminating(rbac)
    assert not namespace_terminating(ApiException(status=500, reason="boom"))


def test_replicas_zero_unloads_even_an_autoscaled_model(context: ModelContext) -> None:
    unloaded = dataclasses.replace(context, spec=context.spec.model_copy(update={"replicas": 0}))
    deployment = workload.build_deployment(unloaded)
    # Explicitly 0, not left to an HPA: the HPA is gone, so nothing would bring pods back.
    assert deployment["spec"]["replicas"] == 0
    assert autoscaling.build_hpa(unloaded) is None
    assert autoscaling.build_pdb(unloaded) is None
    # The pod template does not change, so a load starts the same pods (no new rollout).
    assert deployment["spec"]["template"] == workload.build_deployment(context)["spec"]["template"]


def test_unload_and_load_through_spec_replicas() -> None:
    """Unload sets spec.replicas to 0 (the scale subresource); load restores status.loadReplicas."""
    body = {**MODEL_BODY, "spec": {"runtime": "ollama", "model": "phi3:mini", "replicas": 3}}
    kube = NoScaleToZeroKube()
    loaded = reconcile(cast(Kube, kube), body, RuntimeImages())
    assert loaded.status["loadReplicas"] == 3

    unloaded_body = {**body, "spec": {**body["spec"], "replicas": 0}, "status": loaded.status}
    unloaded = reconcile(cast(Kube, kube), unloaded_body, RuntimeImages())
    assert unloaded.status["loadReplicas"] == 3, "an unload must not forget what to restore"
    conditions = {c["type"]: c for c in unloaded.status["conditions"]}
    assert conditions["Ready"]["reason"] == "Unloaded"
    assert "/v1/admin/models/<name>/load" in conditions["Ready"]["message"]
    assert unloaded.status["phase"] == "Idle"
    deployments = [m for m in kube.applied if m["kind"] == "Deployment"]
    assert (deployments[0]["spec"]["replicas"], deployments[-1]["spec"]["replicas"]) == (3, 0)

    fresh = reconcile(cast(Kube, kube), {**unloaded_body, "status": {}}, RuntimeImages())
    assert fresh.status["loadReplicas"] == 1, "with nothing seen above 0, a load brings up one replica"


def test_an_unloaded_autoscaled_model_has_no_hpa_and_says_unloaded() -> None:
    spec = {"runtime": "ollama", "model": "phi3:mini", "replicas": 0, "autoscaling": {"enabled": True}}
    kube = NoScaleToZeroKube()
    outcome = reconcile(cast(Kube, kube), {**MODEL_BODY, "spec": spec}, RuntimeImages())
    assert not [m for m in kube.applied if m["kind"] == "HorizontalPodAutoscaler"]
    assert {c["type"]: c for c in outcome.status["conditions"]}["Ready"]["reason"] == "Unloaded"


def test_lora_adapters_are_loaded_by_every_replica_and_downloaded_with_the_weights() -> None:
    adapters = [{"name": "gemma-pirate", "model": "org/pirate-lora"}, {"name": "gemma-legal", "model": "org/legal"}]
    plain = fuzzed_context(runtime="vllm", model="org/gemma", source={"huggingFaceEndpoint": "http://hub:8090"})
    context = dataclasses.replace(plain, spec=plain.spec.model_copy(update={
        "adapters": [v1alpha1.Adapter.model_validate(a) for a in adapters]}))  # fmt: skip
    args = workload.build_deployment(context)["spec"]["template"]["spec"]["containers"][0]["args"]
    at = args.index("--lora-modules")
    assert args[at + 1 : at + 3] == ["gemma-pirate=org/pirate-lora", "gemma-legal=org/legal"]
    assert args[args.index("--max-loras") + 1] == "2"
    assert "--enable-lora" in args
    assert "--enable-lora" not in workload.build_deployment(plain)["spec"]["template"]["spec"]["containers"][0]["args"]
    job = cache.build_prefetch_job(context)
    assert job is not None
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MODELFLEET_ADAPTERS"].split() == ["org/pirate-lora", "org/legal"]
    assert env["HF_ENDPOINT"] == "http://hub:8090"
    # A new adapter is a new Job (the model's files already on the volume are not fetched again);
    # a model without adapters keeps the Job it always had.
    assert cache.prefetch_key(context) != cache.prefetch_key(plain)
    assert "MODELFLEET_ADAPTERS" not in {
        e["name"] for e in cache.build_prefetch_job(plain)["spec"]["template"]["spec"]["containers"][0]["env"]
    }  # type: ignore[index]
