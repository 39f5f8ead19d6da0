"""NetworkPolicies: ingress -> router -> backends, and nothing else.

Here, on the kwok nodes, which run no network: the chart's and the operator's policies are
accepted and stored by the real API server, and their selectors, evaluated by the API server's own
label selection against real pods and namespaces, admit exactly the intended sources to exactly the
intended pods and ports. That packets are dropped is proved on the real node, where kube-router
enforces the policies (test_managed_models.py::test_network_policies_drop_what_they_do_not_admit).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modelfleet.api import v1alpha1
from modelfleet.operator.builders import networkpolicy, workload
from modelfleet.operator.builders.common import ModelContext
from modelfleet.operator.settings import OperatorSettings
from tests.e2e.conftest import Cluster, OperatorProcess, wait_for
from tests.e2e.test_chart import Rendered, one, render

pytestmark = pytest.mark.e2e

Labels = dict[str, str]


# NetworkPolicy semantics over plain label maps (matchLabels only: the policies here use nothing else)


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: Labels
    ports: dict[str, int]  # container port name -> number

    def port_number(self, port: int | str) -> int | None:
        return self.ports.get(port) if isinstance(port, str) else port


def selects(selector: dict[str, Any] | None, labels: Labels) -> bool:
    assert set(selector or {}) <= {"matchLabels"}, f"only matchLabels is expected: {selector}"
    return bool(((selector or {}).get("matchLabels") or {}).items() <= labels.items())


def peer_admits(peer: dict[str, Any], policy_namespace: str, source: Pod) -> bool:
    assert "ipBlock" not in peer, "ipBlocks are not expected by default"
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source.namespace})
    else:
        in_namespace = source.namespace == policy_namespace
    return in_namespace and ("podSelector" not in peer or selects(peer["podSelector"], source.labels))


def admits(policies: Rendered, source: Pod, target: Pod, port: int) -> bool:
    """Whether ingress from source to target:port is allowed (pods selected by no policy admit everything)."""
    applicable = [
        p
        for p in policies
        if p["metadata"]["namespace"] == target.namespace
        and selects(p["spec"]["podSelector"], target.labels)
        and "Ingress" in p["spec"]["policyTypes"]
    ]
    if not applicable:
        return True
    for policy in applicable:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            port_ok = ports is None or any(target.port_number(p["port"]) == port for p in ports)
            peers = rule.get("from")
            source_ok = peers is None or any(peer_admits(p, policy["metadata"]["namespace"], source) for p in peers)
            if port_ok and source_ok:
                return True
    return False


def template_pod(objects: Rendered, kind: str, name: str) -> Pod:
    obj = one(objects, kind, name)
    template = obj if kind == "Pod" else obj["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    return Pod(name, obj["metadata"]["namespace"], template["metadata"]["labels"], ports)


def policies_of(objects: Rendered) -> Rendered:
    return [obj for obj in objects if obj["kind"] == "NetworkPolicy"]


RELEASE_NAMESPACE = "mf"
# Sources outside the release: the default ingress controller and Prometheus, and pods that must not get in.
INGRESS_CONTROLLER = Pod(
    "ingress-nginx-controller",
    "ingress-nginx",
    {"app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/component": "controller"},
    {},
)
INGRESS_NEIGHBOUR = Pod("cert-manager", "ingress-nginx", {"app.kubernetes.io/name": "cert-manager"}, {})
PROMETHEUS = Pod("prometheus-0", "monitoring", {"app.kubernetes.io/name": "prometheus"}, {})
GRAFANA = Pod("grafana", "monitoring", {"app.kubernetes.io/name": "grafana"}, {})
NEIGHBOUR = Pod("debug", RELEASE_NAMESPACE, {"app": "debug"}, {})
STRANGER = Pod("anything", "default", {"app": "anything"}, {})


@dataclass
class Release:
    objects: Rendered
    router: Pod
    redis: Pod
    operator: Pod
    test: Pod

    @property
    def policies(self) -> Rendered:
        return policies_of(self.objects)


def release(*options: str) -> Release:
    objects = render(RELEASE_NAMESPACE, *options)
    return Release(
        objects=objects,
        router=template_pod(objects, "Deployment", "modelfleet-router"),
        redis=template_pod(objects, "Deployment", "modelfleet-redis"),
        operator=template_pod(objects, "StatefulSet", "modelfleet-operator"),
        test=template_pod(objects, "Pod", "modelfleet-test-health"),
    )


def admitted(policies: Rendered, sources: list[Pod], target: Pod, port: str) -> set[str]:
    number = target.ports[port]
    return {source.name for source in sources if admits(policies, source, target, number)}


def test_the_chart_admits_ingress_to_router_to_redis_and_prometheus_to_metrics_only() -> None:
    rel = release()
    sources = [
        rel.router,
        rel.redis,
        rel.operator,
        rel.test,
        INGRESS_CONTROLLER,
        INGRESS_NEIGHBOUR,
        PROMETHEUS,
        GRAFANA,
        NEIGHBOUR,
        STRANGER,
    ]
    names = {p["metadata"]["name"] for p in rel.policies}
    assert names == {"modelfleet-router", "modelfleet-redis", "modelfleet-operator"}
    assert admitted(rel.policies, sources, rel.router, "http") == {
        INGRESS_CONTROLLER.name,
        PROMETHEUS.name,
        rel.test.name,
    }
    assert admitted(rel.policies, sources, rel.redis, "redis") == {rel.router.name}
    assert admitted(rel.policies, sources, rel.operator, "metrics") == {PROMETHEUS.name}
    # The health port serves kubelet probes, which NetworkPolicy does not filter; no pod may reach it.
    assert admitted(rel.policies, sources, rel.operator, "health") == set()
    # Every long-running pod of the release is selected by exactly its own policy.
    for pod in (rel.router, rel.redis, rel.operator):
        selecting = [p["metadata"]["name"] for p in rel.policies if selects(p["spec"]["podSelector"], pod.labels)]
        assert selecting == [f"modelfleet-{pod.labels['app.kubernetes.io/component']}"]
    redis_policy = one(rel.objects, "NetworkPolicy", "modelfleet-redis")["spec"]
    assert redis_policy["policyTypes"] == ["Ingress", "Egress"]
    assert not redis_policy.get("egress"), "Redis reaches nothing"


def test_the_selectors_follow_the_values_and_the_policies_can_be_turned_off() -> None:
    traefik = Pod("traefik", "traefik", {"app.kubernetes.io/name": "traefik"}, {})
    lb = {"ipBlock": {"cidr": "10.0.0.0/8"}}
    rel = release(
        "--set-json",
        'networkPolicy.ingressController={"namespaceSelector": {"kubernetes.io/metadata.name":'
        ' "traefik"}, "podSelector": {"app.kubernetes.io/name": "traefik"}}',
        "--set-json",
        f"networkPolicy.extraRouterSources=[{json.dumps(lb)}]",
    )
    router_policy = one(rel.objects, "NetworkPolicy", "modelfleet-router")
    (rule,) = router_policy["spec"]["ingress"]
    assert rule["from"][-1] == lb
    rule["from"].pop()  # the evaluator knows pods, not addresses
    assert admitted(rel.policies, [traefik, INGRESS_CONTROLLER], rel.router, "http") == {"traefik"}

    off = render(RELEASE_NAMESPACE, "--set", "networkPolicy.enabled=false")
    assert not policies_of(off)
    assert operator_env(off)["MODELFLEET_OPERATOR_NETWORK_POLICY"] == "false"
    no_models = render(RELEASE_NAMESPACE, "--set", "networkPolicy.modelPolicies=false")
    assert len(policies_of(no_models)) == 3
    assert operator_env(no_models)["MODELFLEET_OPERATOR_NETWORK_POLICY"] == "false"
    external_redis = render(RELEASE_NAMESPACE, "--set", "redis.externalUrl=redis://cache.infra:6379/0")
    assert {p["metadata"]["name"] for p in policies_of(external_redis)} == {"modelfleet-router", "modelfleet-operator"}


# The operator's per-model policy, configured by the chart ------------------------------------------


def operator_env(objects: Rendered) -> dict[str, str]:
    container = one(objects, "StatefulSet", "modelfleet-operator")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def model_pod(context: ModelContext) -> Pod:
    template = workload.build_deployment(context)["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    return Pod(f"{context.name}-pod", context.namespace, template["metadata"]["labels"], ports)


def model_context(runtime: str, settings: OperatorSettings, name: str = "demo") -> ModelContext:
    spec = {
        "runtime": runtime,
        "model": "phi3:mini" if runtime == "ollama" else "Qwen/Qwen2.5-0.5B",
        "resources": {"gpu": 0, "cpu": "1"},
    }
    return ModelContext(
        name=name,
        namespace="models",
        uid="u",
        spec=v1alpha1.InferenceModelSpec.model_validate(spec),
        network=settings.network_peers,
    )


def test_the_chart_configures_model_policies_that_admit_only_its_router_and_operator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rel = release()
    for key, value in operator_env(rel.objects).items():
        monkeypatch.setenv(key, value)
    settings = OperatorSettings()
    other_release_router = Pod(
        "other-router", RELEASE_NAMESPACE, {**rel.router.labels, "app.kubernetes.io/instance": "other"}, {}
    )
    router_elsewhere = Pod("copycat", "models", rel.router.labels, {})
    sources = [
        rel.router,
        rel.redis,
        rel.operator,
        rel.test,
        INGRESS_CONTROLLER,
        PROMETHEUS,
        GRAFANA,
        NEIGHBOUR,
        STRANGER,
        other_release_router,
        router_elsewhere,
    ]
    for runtime in ("ollama", "vllm"):
        context = model_context(runtime, settings)
        policy = networkpolicy.build_network_policy(context)
        assert policy is not None
        pods = [model_pod(context), model_pod(model_context(runtime, settings, "neighbour"))]
        # The router sends requests; the operator sends each new pod its warm-up generation.
        expected = {rel.router.name, rel.operator.name}
        if runtime == "vllm":
            expected.add(PROMETHEUS.name)
        assert admitted([policy], sources + pods[1:], pods[0], "http") == expected, runtime
        # Only this model's pods are selected: the neighbouring model's are left to its own policy.
        assert admits([policy], STRANGER, pods[1], pods[1].ports["http"])


def test_the_operator_defaults_match_the_default_install() -> None:
    """Run without the chart (e.g. from manifests/rbac), the operator admits the default install's router."""
    objects = render("modelfleet-system")
    router = template_pod(objects, "Deployment", "modelfleet-router")
    context = model_context("ollama", OperatorSettings())
    policy = networkpolicy.build_network_policy(context)
    assert policy is not None
    assert admits([policy], router, model_pod(context), workload.serving_port(context))


# Against the API server: the policies are valid, and select the real pods and namespaces ---------


def label_selector(selector: dict[str, Any] | None) -> str:
    assert set(selector or {}) <= {"matchLabels"}, selector
    return ",".join(f"{key}={value}" for key, value in ((selector or {}).get("matchLabels") or {}).items())


def pod_names(core: client.CoreV1Api, namespace: str, selector: dict[str, Any] | None) -> set[str]:
    return {
        pod.metadata.name for pod in core.list_namespaced_pod(namespace, label_selector=label_selector(selector)).items
    }


def sources_admitted(core: client.CoreV1Api, policy: dict[str, Any]) -> set[str]:
    """namespace/name of every pod the policy's peers select, by the API server's own label selection."""
    found: set[str] = set()
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            if "namespaceSelector" in peer:
                namespaces = [
                    ns.metadata.name
                    for ns in core.list_namespace(label_selector=label_selector(peer["namespaceSelector"])).items
                ]
            else:
                namespaces = [policy["metadata"]["namespace"]]
            for namespace in namespaces:
                found |= {f"{namespace}/{name}" for name in pod_names(core, namespace, peer.get("podSelector"))}
    return found


@pytest.fixture
def extra_namespaces(cluster: Cluster) -> Iterator[dict[str, str]]:
    """Stand-ins for the ingress controller's and Prometheus's namespaces, deleted afterwards."""
    core = client.CoreV1Api(cluster.api)
    names = {role: f"t-np-{role}-{uuid.uuid4().hex[:6]}" for role in ("ingress", "monitoring")}
    for name in names.values():
        core.create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"modelfleet.io/test": "e2e"}))
        )
    try:
        yield names
    finally:
        for name in names.values():
            try:
                core.delete_namespace(name, propagation_policy="Background")
            except ApiException as exc:
                if exc.status != 404:
                    raise


def source_pod(name: str, labels: Labels) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]},
    }


def all_running(core: client.CoreV1Api, namespaces: list[str], count: int) -> bool:
    pods = [p for ns in namespaces for p in core.list_namespaced_pod(ns).items]
    return len(pods) == count and all(p.status.phase == "Running" for p in pods)


def test_the_chart_policies_are_valid_and_select_the_real_pods(
    cluster: Cluster, namespace: str, extra_namespaces: dict[str, str]
) -> None:
    ingress_ns, monitoring_ns = extra_namespaces["ingress"], extra_namespaces["monitoring"]
    objects = render(
        namespace,
        "--set-json",
        f'networkPolicy.ingressController.namespaceSelector={{"kubernetes.io/metadata.name": "{ingress_ns}"}}',
        "--set-json",
        f'networkPolicy.prometheus.namespaceSelector={{"kubernetes.io/metadata.name": "{monitoring_ns}"}}',
    )
    # The release's pods and what they need, for real (cluster-scoped RBAC and peering are not needed to run them).
    kinds = {"ServiceAccount", "Secret", "ConfigMap", "Service", "Deployment", "StatefulSet", "Pod", "NetworkPolicy"}
    namespaced = [o for o in objects if o["kind"] in kinds]
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input_text=yaml.safe_dump_all(namespaced))
    sources = {
        ingress_ns: [source_pod("controller", INGRESS_CONTROLLER.labels), source_pod("neighbour", {"app": "x"})],
        monitoring_ns: [source_pod("prometheus", PROMETHEUS.labels), source_pod("grafana", GRAFANA.labels)],
        namespace: [source_pod("debug", NEIGHBOUR.labels)],
    }
    for where, pods in sources.items():
        cluster.kubectl("apply", "-n", where, "-f", "-", input_text=yaml.safe_dump_all(pods))
    core = client.CoreV1Api(cluster.api)
    # 2 routers, 1 Redis, 2 operators, the helm test pod, the debug pod; 4 pods in the other namespaces.
    wait_for(
        lambda: all_running(core, [namespace, ingress_ns, monitoring_ns], 11), what="every pod Running", timeout=90
    )

    stored = {
        p.metadata.name: cluster.api.sanitize_for_serialization(p)
        for p in client.NetworkingV1Api(cluster.api).list_namespaced_network_policy(namespace).items
    }
    assert set(stored) == {"modelfleet-router", "modelfleet-redis", "modelfleet-operator"}
    for name, policy in stored.items():
        rendered = one(objects, "NetworkPolicy", name)["spec"]
        assert policy["spec"]["podSelector"] == rendered["podSelector"]
        assert policy["spec"]["ingress"] == rendered["ingress"], "the API server keeps every rule as rendered"

    def component(name: str) -> set[str]:
        return pod_names(core, namespace, {"matchLabels": {"app.kubernetes.io/component": name}})

    routers, redis, operators, test = component("router"), component("redis"), component("operator"), component("test")
    assert (len(routers), len(redis), len(operators), len(test)) == (2, 1, 2, 1)
    selected = {name: pod_names(core, namespace, policy["spec"]["podSelector"]) for name, policy in stored.items()}
    assert selected == {"modelfleet-router": routers, "modelfleet-redis": redis, "modelfleet-operator": operators}

    def qualified(names: set[str], where: str = namespace) -> set[str]:
        return {f"{where}/{name}" for name in names}

    assert sources_admitted(core, stored["modelfleet-router"]) == (
        {f"{ingress_ns}/controller", f"{monitoring_ns}/prometheus"} | qualified(test)
    )
    assert sources_admitted(core, stored["modelfleet-redis"]) == qualified(routers)
    assert sources_admitted(core, stored["modelfleet-operator"]) == {f"{monitoring_ns}/prometheus"}
    ports = {
        name: [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
        for name, policy in stored.items()
    }
    assert ports == {"modelfleet-router": ["http"], "modelfleet-redis": ["redis"], "modelfleet-operator": ["metrics"]}


# The operator's per-model policy, from a real operator run ---------------------------------------


def model(name: str, runtime: str) -> dict[str, Any]:
    spec = {
        "runtime": runtime,
        "model": "np:latest" if runtime == "ollama" else "org/np",
        "resources": {"gpu": 0, "cpu": "1", "memory": "1Gi"},
        "cache": {"size": "1Gi"},
    }
    return {
        "apiVersion": f"{v1alpha1.GROUP}/{v1alpha1.VERSION}",
        "kind": v1alpha1.KIND,
        "metadata": {"name": name},
        "spec": spec,
    }


def read_policy(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        policy = client.NetworkingV1Api(cluster.api).read_namespaced_network_policy(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    result: dict[str, Any] = cluster.api.sanitize_for_serialization(policy)
    return result


def test_the_operator_gives_each_model_a_policy_that_admits_only_the_router_and_operator(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    custom = client.CustomObjectsApi(cluster.api)
    for name, runtime in (("np-ollama", "ollama"), ("np-vllm", "vllm")):
        custom.create_namespaced_custom_object(
            v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, model(name, runtime)
        )
    for name in ("np-ollama", "np-vllm"):
        cluster.kubectl(
            "wait", "--for=condition=Ready", f"inferencemodels.modelfleet.io/{name}", "-n", namespace, "--timeout=120s"
        )
    core = client.CoreV1Api(cluster.api)
    # Same labels as the router, wrong namespace: must not get in.
    cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input_text=yaml.safe_dump(
            source_pod(
                "impostor",
                {
                    "app.kubernetes.io/name": "modelfleet",
                    "app.kubernetes.io/instance": "modelfleet",
                    "app.kubernetes.io/component": "router",
                },
            )
        ),
    )
    # The default install's router (release modelfleet in modelfleet-system) is who the defaults admit.
    router = template_pod(render("modelfleet-system"), "Deployment", "modelfleet-router")

    for name in ("np-ollama", "np-vllm"):
        policy = read_policy(cluster, namespace, f"im-{name}")
        assert policy is not None, f"no NetworkPolicy for {name}"
        owner = policy["metadata"]["ownerReferences"][0]
        uid = custom.get_namespaced_custom_object(v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, name)[
            "metadata"
        ]["uid"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("InferenceModel", name, uid, True)
        # Selected by the API server: exactly this model's pods, serving ones included.
        selected = pod_names(core, namespace, policy["spec"]["podSelector"])
        own = pod_names(core, namespace, {"matchLabels": {"modelfleet.io/model": name}})
        serving = pod_names(
            core,
            namespace,
            {"matchLabels": {"modelfleet.io/model": name, "app.kubernetes.io/component": "model-server"}},
        )
        assert serving, f"{name} has no serving pods"
        assert selected == own
        (rule,) = policy["spec"]["ingress"]
        deployment = client.AppsV1Api(cluster.api).read_namespaced_deployment(f"im-{name}", namespace)
        assert [p["port"] for p in rule["ports"]] == [
            deployment.spec.template.spec.containers[0].ports[0].container_port
        ]
        router_peer, *others = rule["from"]
        namespaces = [
            ns.metadata.name
            for ns in core.list_namespace(label_selector=label_selector(router_peer["namespaceSelector"])).items
        ]
        assert namespaces == ["modelfleet-system"]
        assert selects(router_peer["podSelector"], router.labels)
        operator_pod = template_pod(render("modelfleet-system"), "StatefulSet", "modelfleet-operator")
        operator_peer, *others = others
        assert operator_peer["namespaceSelector"] == router_peer["namespaceSelector"]
        assert selects(operator_peer["podSelector"], operator_pod.labels), "the operator sends the warm-up"
        assert not selects(operator_peer["podSelector"], router.labels)
        assert [o["podSelector"]["matchLabels"] for o in others] == (
            [{"app.kubernetes.io/name": "prometheus"}] if name == "np-vllm" else []
        )
        admitted_pods = sources_admitted(core, policy)
        assert f"{namespace}/impostor" not in admitted_pods
        assert all(pod.startswith(("modelfleet-system/", "monitoring/")) for pod in admitted_pods), admitted_pods

    # A deleted policy comes back (the operator watches NetworkPolicies like every child) ...
    client.NetworkingV1Api(cluster.api).delete_namespaced_network_policy("im-np-ollama", namespace)
    wait_for(
        lambda: read_policy(cluster, namespace, "im-np-ollama") is not None,
        what="the policy to be recreated",
        timeout=30,
    )
    # ... and goes with its model.
    custom.delete_namespaced_custom_object(v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, "np-ollama")
    wait_for(
        lambda: read_policy(cluster, namespace, "im-np-ollama") is None, what="the policy to be collected", timeout=60
    )
    # The tightened RBAC (Events create only, status patch only) is all the operator needed.
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.kind=InferenceModel").items
    assert {event.involved_object.name for event in events} >= {"np-ollama", "np-vllm"}
    # (A namespace being deleted refuses everything with 403 too: other tests' namespaces, not RBAC.)
    log = operator.process.log_path.read_text(errors="replace").splitlines()
    refused = [line for line in log if "forbidden" in line.lower() and "being terminated" not in line]
    assert not refused, refused[:5]
