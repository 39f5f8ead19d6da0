"""The Helm chart: lint, a matrix of values, the schema, and every rendered object accepted by the real
API server (server-side dry run), with pods that pass Pod Security "restricted"."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.e2e.conftest import Cluster
from tests.support.cluster import BIN_DIR

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelfleet"
HELM = BIN_DIR / "helm"
MONITORING = ["--api-versions", "monitoring.coreos.com/v1"]
# docs/own-cluster.md's sample values for a GPU cluster: every check of the chart's own values runs on them too.
GPU_CLUSTER = ("--values", str(REPO / "examples" / "values-gpu-cluster.yaml"))
VALUES_FILES = [pytest.param((), id="chart-defaults"), pytest.param(GPU_CLUSTER, id="gpu-cluster-sample")]

Rendered = list[dict[str, Any]]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def render(namespace: str = "modelfleet-system", *options: str) -> Rendered:
    out = helm("template", "modelfleet", str(CHART), "--namespace", namespace, *options).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def kinds(objects: Rendered) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for obj in objects:
        found.setdefault(obj["kind"], []).append(obj["metadata"]["name"])
    return found


def one(objects: Rendered, kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def router_env(objects: Rendered) -> dict[str, str]:
    container = one(objects, "Deployment", "modelfleet-router")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container["env"]}


@pytest.mark.parametrize("values", VALUES_FILES)
def test_lint_is_clean_in_strict_mode(values: tuple[str, ...]) -> None:
    result = helm("lint", "--strict", str(CHART), *values)
    assert "0 chart(s) failed" in result.stdout


def test_defaults() -> None:
    objects = render()
    found = kinds(objects)
    assert found["StatefulSet"] == ["modelfleet-operator"]
    assert sorted(found["Deployment"]) == ["modelfleet-redis", "modelfleet-router"]
    assert "ServiceMonitor" not in found, "no Prometheus Operator CRDs: no ServiceMonitor"
    assert "Ingress" not in found
    assert "HorizontalPodAutoscaler" not in found
    env = router_env(objects)
    assert env["MODELFLEET_REDIS_URL"] == "redis://modelfleet-redis.modelfleet-system.svc:6379/0"
    assert env["MODELFLEET_AUTH_REQUIRED"] == "true"
    assert env["MODELFLEET_KUBERNETES_DISCOVERY"] == "true"
    # The drain and the streams' grace fit in the pod's grace period, with time to spare before the kill.
    router_pod = one(objects, "Deployment", "modelfleet-router")["spec"]["template"]["spec"]
    shutdown = int(env["MODELFLEET_SHUTDOWN_DRAIN_SECONDS"]) + int(env["MODELFLEET_SHUTDOWN_GRACE_SECONDS"])
    assert 0 < shutdown < router_pod["terminationGracePeriodSeconds"]
    secret = one(objects, "Secret", "modelfleet-api-keys")["stringData"]
    keys = yaml.safe_load(secret["keys.yaml"])["keys"]
    assert [k["name"] for k in keys] == ["default", "admin"]
    assert all(len(k["sha256"]) == 64 for k in keys)
    assert secret["user-key"] not in secret["keys.yaml"], "the router's file holds digests only"
    assert one(objects, "PodDisruptionBudget", "modelfleet-router")["spec"]["maxUnavailable"] == 1
    dashboard = one(objects, "ConfigMap", "modelfleet-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["modelfleet.json"])["uid"] == "modelfleet-router"


def test_redis_off_or_external() -> None:
    off = render("modelfleet-system", "--set", "redis.enabled=false")
    assert "modelfleet-redis" not in kinds(off)["Deployment"]
    assert "MODELFLEET_REDIS_URL" not in router_env(off), "without Redis the router keeps cache and limits in-process"
    external = render("modelfleet-system", "--set", "redis.externalUrl=redis://cache.infra:6379/2")
    assert "modelfleet-redis" not in kinds(external)["Deployment"]
    assert router_env(external)["MODELFLEET_REDIS_URL"] == "redis://cache.infra:6379/2"


def test_ingress_carries_sse_settings() -> None:
    objects = render("modelfleet-system", "--set", "ingress.enabled=true", "--set", "ingress.className=nginx",
                     "--set", "ingress.host=llm.example.com", "--set", "ingress.tlsSecretName=llm-tls")  # fmt: skip
    ingress = one(objects, "Ingress", "modelfleet-router")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"][0]["hosts"] == ["llm.example.com"]
    # The APIs only: the metrics, the API docs and the probes are not published.
    (rule,) = ingress["spec"]["rules"]
    assert {(p["path"], p["pathType"]) for p in rule["http"]["paths"]} == {
        ("/v1", "Prefix"), ("/infer", "Exact"), ("/health", "Exact")}  # fmt: skip


def test_monitoring_when_the_prometheus_operator_crds_exist() -> None:
    objects = render("modelfleet-system", *MONITORING)
    rule = one(objects, "PrometheusRule", "modelfleet")
    alerts = {r["alert"] for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r}
    assert {"ModelFleetHighErrorRate", "ModelFleetQueueSaturated", "ModelFleetModelNotReady",
            "ModelFleetRedisDown"} <= alerts  # fmt: skip
    monitor = one(objects, "ServiceMonitor", "modelfleet")
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"http", "metrics"}
    # vLLM's own metrics, for autoscaling.metric=engine: the vllm containers of the operator's pods.
    pods = one(objects, "PodMonitor", "modelfleet-vllm")
    selected = {"app.kubernetes.io/managed-by": "modelfleet-operator", "app.kubernetes.io/component": "model-server"}
    assert pods["spec"]["selector"]["matchLabels"] == selected
    assert pods["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = pods["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["relabelings"][0]["regex"]) == ("http", "vllm")
    scoped = render("modelfleet-system", *MONITORING, "--set-json", 'operator.watchNamespaces=["models"]')
    assert one(scoped, "PodMonitor", "modelfleet-vllm")["spec"]["namespaceSelector"] == {"matchNames": ["models"]}
    off = render("modelfleet-system", *MONITORING, "--set", "monitoring.enabled=false")
    assert "ServiceMonitor" not in kinds(off)
    assert "PodMonitor" not in kinds(off)


def test_the_gpu_cluster_sample_renders_what_its_comments_say() -> None:
    """examples/values-gpu-cluster.yaml: the user's images and keys, an SSE-ready ingress, the monitoring."""
    objects = render("modelfleet-system", *GPU_CLUSTER, *MONITORING)
    router = one(objects, "Deployment", "modelfleet-router")["spec"]["template"]["spec"]
    operator = one(objects, "StatefulSet", "modelfleet-operator")["spec"]["template"]["spec"]
    assert router["containers"][0]["image"] == "registry.example.com/modelfleet/router:0.1.0"
    assert operator["containers"][0]["image"] == "registry.example.com/modelfleet/operator:0.1.0"
    assert router["imagePullSecrets"] == operator["imagePullSecrets"] == [{"name": "regcred"}]
    assert "Secret" not in kinds(objects), "the keys come from the user's own Secret"
    assert {"name": "api-keys", "secret": {"secretName": "modelfleet-api-keys",
            "items": [{"key": "keys.yaml", "path": "keys.yaml"}]}} in router["volumes"]  # fmt: skip
    assert router_env(objects)["MODELFLEET_REDIS_URL"] == "redis://modelfleet-redis.modelfleet-system.svc:6379/0"
    annotations = one(objects, "Ingress", "modelfleet-router")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"
    assert one(objects, "ServiceMonitor", "modelfleet")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rules = yaml.safe_load(one(objects, "ConfigMap", "modelfleet-adapter-rules")["data"]["config.yaml"])
    assert [rule["name"]["as"] for rule in rules["externalRules"]] == ["modelfleet_queue_depth"]


def test_autoscaling_replaces_fixed_replicas() -> None:
    objects = render("modelfleet-system", "--set", "router.autoscaling.enabled=true")
    hpa = one(objects, "HorizontalPodAutoscaler", "modelfleet-router")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert "replicas" not in one(objects, "Deployment", "modelfleet-router")["spec"]


def container_env(objects: Rendered, kind: str, name: str) -> dict[str, str]:
    """The literal env of a workload's first container (valueFrom entries come from the pod at run time)."""
    container = one(objects, kind, name)["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param((), {}, id="defaults"),
        # Helm renders numbers of a million and more as 1e+06 unless the template says int64.
        pytest.param(
            (
                *("--set", "router.rateLimit.tokensPerMinute=2000000", "--set", "router.maxBodyBytes=8388608"),
                *("--set", "router.cache.size=1000000", "--set", "router.cache.ttlSeconds=86400000"),
            ),
            {"rate_limit_tokens_per_minute": 2_000_000, "max_body_bytes": 8_388_608},
            id="large",
        ),
        pytest.param(GPU_CLUSTER, {"rate_limit_requests_per_minute": 600}, id="gpu-cluster-sample"),
    ],
)
def test_every_rendered_setting_is_accepted_by_the_settings_it_configures(
    options: tuple[str, ...], expected: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart's env values are read by the real settings classes, as the containers would at start."""
    from modelfleet.operator.settings import OperatorSettings
    from modelfleet.server.settings import RouterSettings

    objects = render("modelfleet-system", *options)
    for name in [n for n in os.environ if n.startswith("MODELFLEET_")]:
        monkeypatch.delenv(name)
    for name, value in container_env(objects, "Deployment", "modelfleet-router").items():
        monkeypatch.setenv(name, value)
    router = RouterSettings()
    assert {name: getattr(router, name) for name in expected} == expected
    for name in [n for n in os.environ if n.startswith("MODELFLEET_")]:
        monkeypatch.delenv(name)
    for name, value in container_env(objects, "StatefulSet", "modelfleet-operator").items():
        monkeypatch.setenv(name, value)
    OperatorSettings()


def test_existing_key_secret_and_auth_off() -> None:
    existing = render("modelfleet-system", "--set", "router.auth.existingSecret=my-keys")
    assert "Secret" not in kinds(existing)
    volumes = one(existing, "Deployment", "modelfleet-router")["spec"]["template"]["spec"]["volumes"]
    keys_volume = {
        "name": "api-keys",
        "secret": {"secretName": "my-keys", "items": [{"key": "keys.yaml", "path": "keys.yaml"}]},
    }
    assert keys_volume in volumes
    open_router = render("modelfleet-system", "--set", "router.auth.required=false")
    assert router_env(open_router)["MODELFLEET_AUTH_REQUIRED"] == "false"
    assert "MODELFLEET_API_KEYS_FILE" not in router_env(open_router)


def test_router_workers_need_redis_while_limits_are_on() -> None:
    assert router_env(render("modelfleet-system", "--set", "router.workers=2"))["MODELFLEET_WORKERS"] == "2"
    refused = helm(
        "template", "x", str(CHART), "--set", "router.workers=2", "--set", "redis.enabled=false", check=False
    )
    assert refused.returncode != 0
    assert "router.workers above 1 needs Redis" in refused.stderr
    unlimited = ("--set", "redis.enabled=false", "--set", "router.auth.required=false",
                 "--set", "router.rateLimit.requestsPerMinute=0", "--set", "router.workers=2")  # fmt: skip
    assert router_env(render("modelfleet-system", *unlimited))["MODELFLEET_WORKERS"] == "2"


@pytest.mark.parametrize(
    ("setting", "message"),
    [("router.replica=3", "additional properties 'replica' not allowed"),
     ("router.workers=0", "minimum"),
     ("router.rateLimit.failureMode=maybe", "value must be one of 'open', 'closed'"),
     ("router.replicas=0", "minimum"),
     ("redis.enabled=yes", "got string, want boolean")],
)  # fmt: skip
def test_the_schema_refuses_bad_values(setting: str, message: str) -> None:
    result = helm("template", "x", str(CHART), "--set-string" if "yes" in setting else "--set", setting, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def rules_of(documents: Rendered, kind: str = "ClusterRole") -> dict[str, Any]:
    return {doc["metadata"]["name"]: doc["rules"] for doc in documents if doc["kind"] == kind}


def test_rbac_equals_the_plain_manifests_the_e2e_tests_run_with() -> None:
    chart = rules_of(render())
    for name in ("operator", "router"):
        manifest = list(yaml.safe_load_all((REPO / "manifests" / "rbac" / f"{name}.yaml").read_text()))
        assert chart[f"modelfleet-{name}"] == rules_of(manifest)[f"modelfleet-{name}"]


def test_the_router_may_not_read_secrets() -> None:
    """It reads models and their endpoints; the one thing it may write is a model's replica count."""
    router_rules = rules_of(render())["modelfleet-router"]
    granted = {(resource, verb) for rule in router_rules for resource in rule["resources"] for verb in rule["verbs"]}
    reads = {
        (resource, verb) for resource in ("inferencemodels", "endpointslices") for verb in ("get", "list", "watch")
    }
    assert granted == reads | {("inferencemodels/scale", "patch")}


# Against the API server ------------------------------------------------------------------------

# The models' namespace set to the test's own ({namespace}, filled in by the test): a release scoped to a namespace
# has the operator's Role created there, and the dry run, like an install, needs the namespace to exist.
MODELS_IN_TEST_NAMESPACE = ["--set-json", 'operator.watchNamespaces=["{namespace}"]',
                            "--set", "router.discoveryNamespace={namespace}"]  # fmt: skip
MATRIX = {
    "defaults": [],
    "redis-off": ["--set", "redis.enabled=false"],
    "redis-external": ["--set", "redis.externalUrl=redis://cache.infra:6379/0"],
    "ingress": ["--set", "ingress.enabled=true", "--set", "ingress.className=nginx"],
    "monitoring": MONITORING,
    "autoscaling": ["--set", "router.autoscaling.enabled=true"],
    "gpu-cluster-sample": [*GPU_CLUSTER, *MONITORING, *MODELS_IN_TEST_NAMESPACE],
}


@pytest.fixture(scope="module")
def chart_crds(cluster: Cluster, inferencemodel_crd: str, prometheus_operator_crds: Path) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=60s")


def dry_run(cluster: Cluster, objects: Rendered) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("apply", "--dry-run=server", "--server-side", "-f", "-",
                           input_text=yaml.safe_dump_all(objects), check=False)  # fmt: skip


@pytest.mark.parametrize("case", list(MATRIX))
def test_every_rendered_object_is_accepted_by_the_api_server(
    case: str, cluster: Cluster, chart_crds: None, namespace: str
) -> None:
    objects = render(namespace, *(option.format(namespace=namespace) for option in MATRIX[case]))
    result = dry_run(cluster, objects)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(objects)


def pod_templates(objects: Rendered) -> list[tuple[str, dict[str, Any]]]:
    pods = []
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            pods.append((f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "Pod":
            pods.append((f"Pod/{obj['metadata']['name']}", obj["spec"]))
    return pods


@pytest.fixture
def restricted_namespace(cluster: Cluster, namespace: str) -> str:
    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    client.CoreV1Api(cluster.api).patch_namespace(namespace, {"metadata": {"labels": labels}})
    return namespace


def create_pod_dry_run(cluster: Cluster, namespace: str, spec: dict[str, Any]) -> Callable[[], object]:
    # The ServiceAccounts are not created by a dry run; Pod Security does not look at them.
    spec = {key: value for key, value in spec.items() if key != "serviceAccountName"}
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "psa-"}, "spec": spec}
    return lambda: client.CoreV1Api(cluster.api).create_namespaced_pod(namespace, body, dry_run="All")


@pytest.mark.parametrize("values", VALUES_FILES)
def test_every_pod_passes_pod_security_restricted(
    values: tuple[str, ...], cluster: Cluster, restricted_namespace: str
) -> None:
    objects = render(restricted_namespace, *values, *MONITORING)
    templates = pod_templates(objects)
    assert {name for name, _ in templates} >= {"StatefulSet/modelfleet-operator", "Deployment/modelfleet-router",
                                               "Deployment/modelfleet-redis", "Pod/modelfleet-test-health"}  # fmt: skip
    for _name, spec in templates:
        create_pod_dry_run(cluster, restricted_namespace, spec)()  # raises 403 with the violations if any
    # The check can fail: the same pod without its security context is refused.
    spec = dict(templates[0][1])
    spec["securityContext"] = {}
    spec["containers"] = [{**c, "securityContext": {}} for c in spec["containers"]]
    with pytest.raises(client.ApiException) as refused:
        create_pod_dry_run(cluster, restricted_namespace, spec)()
    assert refused.value.status == 403
    assert "violates PodSecurity" in str(refused.value.body)
