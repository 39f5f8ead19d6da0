"""Least privilege, proved by impersonation: what the API server lets each ServiceAccount do is exactly
an explicit allowlist, in every namespace, so any widening of manifests/rbac or the chart fails here."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modelfleet.api import v1alpha1
from tests.e2e.conftest import Cluster, client_with_token
from tests.e2e.test_chart import render

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
RBAC = [REPO / "manifests" / "rbac" / "operator.yaml", REPO / "manifests" / "rbac" / "router.yaml"]
SYSTEM_NAMESPACE = "modelfleet-system"

Permission = tuple[str, str]  # (resource.group[/subresource], verb), as `kubectl auth can-i --list` names them

READ = ("get", "list", "watch")
MANAGE = (*READ, "create", "patch", "delete")


def grant(resources: list[str], verbs: tuple[str, ...]) -> set[Permission]:
    return {(resource, verb) for resource in resources for verb in verbs}


# The router learns which models exist (InferenceModels) and where their ready pods are (EndpointSlices
# of the im-<name> Services): server/modelfleet/server/discovery.py.  Load and unload set a model's
# spec.replicas through the scale subresource, and may neither read nor change anything else of it:
# server/modelfleet/server/scaling.py.
ROUTER_ALLOWED = grant(["inferencemodels.modelfleet.io", "endpointslices.discovery.k8s.io"], READ) | grant(
    ["inferencemodels.modelfleet.io/scale"], ("patch",)
)

# The operator (operator/modelfleet/operator): handlers.py, reconcile.py, apply.py and Kopf.
OPERATOR_ALLOWED = (
    # Kopf watches the models and records its progress annotations on them (patch, never update).
    grant(["inferencemodels.modelfleet.io"], (*READ, "patch"))
    # The controller (kube.patch_model_status) patches the status subresource; nothing reads it separately.
    | grant(["inferencemodels.modelfleet.io/status"], ("patch",))
    # The children: server-side applied (patch, and create for a new one), watched, and deleted
    # when no longer wanted (stale prefetch Jobs, HPA/PDB/NetworkPolicy turned off).
    | grant(
        [
            "deployments.apps",
            "jobs.batch",
            "services",
            "persistentvolumeclaims",
            "horizontalpodautoscalers.autoscaling",
            "poddisruptionbudgets.policy",
            "networkpolicies.networking.k8s.io",
        ],
        MANAGE,
    )
    # Pods are observed, for scheduling and crash-loop status, and get the warm-up condition.
    | grant(["pods"], READ)
    | grant(["pods/status"], ("patch",))
    # kopf.event posts core/v1 Events.
    | grant(["events"], ("create",))
    # Kopf's resource discovery, and its peering (heartbeats are patches).
    | grant(["customresourcedefinitions.apiextensions.k8s.io"], READ)
    | grant(["clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"], (*READ, "patch"))
)

# What Kubernetes gives every authenticated ServiceAccount (system:basic-user, system:discovery, ...).
BASELINE_RESOURCES = {
    ("selfsubjectreviews.authentication.k8s.io", "create"),
    ("selfsubjectaccessreviews.authorization.k8s.io", "create"),
    ("selfsubjectrulesreviews.authorization.k8s.io", "create"),
    # Kubernetes 1.37 turns ClusterTrustBundles on and binds system:cluster-trust-bundle-discovery to
    # every authenticated user: public CA certificates, read-only.
    ("clustertrustbundles.certificates.k8s.io", "get"),
    ("clustertrustbundles.certificates.k8s.io", "list"),
    ("clustertrustbundles.certificates.k8s.io", "watch"),
}


@dataclass(frozen=True)
class Identity:
    namespace: str
    name: str

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"

    @property
    def groups(self) -> list[str]:
        """The groups a real token of this ServiceAccount carries, so group bindings count too."""
        return ["system:serviceaccounts", f"system:serviceaccounts:{self.namespace}", "system:authenticated"]

    def impersonation(self) -> list[str]:
        return [f"--as={self.user}", *(f"--as-group={group}" for group in self.groups[:2])]


ROUTER = Identity(SYSTEM_NAMESPACE, "modelfleet-router")
OPERATOR = Identity(SYSTEM_NAMESPACE, "modelfleet-operator")


@dataclass(frozen=True)
class Rules:
    resources: frozenset[Permission]
    non_resource: frozenset[tuple[str, str]]  # (url, verb)


def parse_can_i_list(output: str) -> Rules:
    """`kubectl auth can-i --list` prints a table whose columns start where their headers do."""
    header, *lines = output.splitlines()
    starts = [header.index(title) for title in ("Resources", "Non-Resource URLs", "Resource Names", "Verbs")]
    resources: set[Permission] = set()
    non_resource: set[tuple[str, str]] = set()
    for line in lines:
        resource, urls, names, verbs = (
            line[start:end].strip() for start, end in zip(starts, [*starts[1:], None], strict=True)
        )
        assert names == "[]", f"unexpected rule limited to resource names: {line}"
        for verb in verbs.strip("[]").split():
            if resource:
                assert urls == "[]", line
                resources.add((resource, verb))
            else:
                non_resource.update((url, verb) for url in urls.strip("[]").split())
    return Rules(frozenset(resources), frozenset(non_resource))


def can_i_list(cluster: Cluster, identity: Identity, namespace: str) -> Rules:
    result = cluster.kubectl("auth", "can-i", "--list", "-n", namespace, *identity.impersonation())
    return parse_can_i_list(result.stdout)


def allowed(cluster: Cluster, identity: Identity, verb: str, resource: str, namespace: str = "") -> bool:
    """A SubjectAccessReview for the ServiceAccount (with its groups); namespace "" asks cluster-wide."""
    kind, _, subresource = resource.partition("/")  # e.g. pods/exec, inferencemodels.modelfleet.io/status
    name, _, api_group = kind.partition(".")
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=identity.user,
            groups=identity.groups,
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, group=api_group, resource=name, subresource=subresource or None, namespace=namespace or None
            ),
        )
    )
    status = client.AuthorizationV1Api(cluster.api).create_subject_access_review(review).status
    assert status is not None
    return bool(status.allowed)


@pytest.fixture(scope="module")
def rbac(cluster: Cluster, inferencemodel_crd: str) -> None:
    """manifests/rbac applied server-side, as the e2e operator and router fixtures apply them."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", *(arg for p in RBAC for arg in ("-f", str(p))))


@pytest.fixture
def baseline(cluster: Cluster, namespace: str) -> Rules:
    """What a ServiceAccount with no bindings of its own may do: only ask about itself and read discovery."""
    rules = can_i_list(cluster, Identity(namespace, "nobody"), namespace)
    assert rules.resources == BASELINE_RESOURCES
    assert {verb for _, verb in rules.non_resource} == {"get"}
    return rules


def namespaces_to_check(namespace: str) -> list[str]:
    """A fresh namespace, the ServiceAccounts' own (where a stray Role would sit), and the system ones."""
    return [namespace, SYSTEM_NAMESPACE, "kube-system", "default"]


@pytest.mark.parametrize(("identity", "expected"), [(ROUTER, ROUTER_ALLOWED), (OPERATOR, OPERATOR_ALLOWED)],
                         ids=["router", "operator"])  # fmt: skip
def test_each_account_may_do_exactly_its_allowlist_in_every_namespace(
    cluster: Cluster, rbac: None, namespace: str, baseline: Rules, identity: Identity, expected: set[Permission]
) -> None:
    for where in namespaces_to_check(namespace):
        rules = can_i_list(cluster, identity, where)
        extra = rules.resources - BASELINE_RESOURCES - expected
        missing = expected - rules.resources
        assert not extra, f"{identity.name} may do more than its allowlist in {where}: {sorted(extra)}"
        assert not missing, f"{identity.name} lacks {sorted(missing)} in {where}"
        assert rules.non_resource == baseline.non_resource, f"{identity.name}: non-resource URLs in {where}"


# Spelled out, beside the allowlist: the permissions an attacker holding a token would want.
DENIED_TO_BOTH = [
    *[(verb, "secrets", where) for verb in READ for where in ("", "NS", SYSTEM_NAMESPACE, "kube-system")],
    ("get", "configmaps", "NS"),
    ("create", "pods/exec", "NS"),
    ("create", "pods/attach", "NS"),
    ("create", "pods/portforward", "NS"),
    ("create", "pods", "NS"),
    ("create", "serviceaccounts/token", SYSTEM_NAMESPACE),
    ("impersonate", "users", ""),
    ("impersonate", "serviceaccounts", "NS"),
    *[
        (verb, kind, "")
        for verb in ("create", "patch", "bind", "escalate")
        for kind in ("clusterroles.rbac.authorization.k8s.io", "clusterrolebindings.rbac.authorization.k8s.io")
    ],
    *[
        (verb, kind, "NS")
        for verb in ("create", "patch", "bind", "escalate")
        for kind in ("roles.rbac.authorization.k8s.io", "rolebindings.rbac.authorization.k8s.io")
    ],
    ("patch", "nodes", ""),
    ("delete", "nodes", ""),
    ("patch", "nodes/status", ""),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("patch", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("create", "namespaces", ""),
    ("delete", "namespaces", "NS"),
    ("create", "mutatingwebhookconfigurations.admissionregistration.k8s.io", ""),
    ("create", "validatingadmissionpolicies.admissionregistration.k8s.io", ""),
    ("create", "certificatesigningrequests.certificates.k8s.io", ""),
    ("update", "certificatesigningrequests.certificates.k8s.io/approval", ""),
    ("create", "tokenreviews.authentication.k8s.io", ""),
    ("deletecollection", "deployments.apps", "NS"),
    ("update", "deployments.apps", "NS"),  # only server-side apply (patch) is needed
    ("create", "leases.coordination.k8s.io", "kube-system"),
]
DENIED_TO_ROUTER = [
    ("list", "pods", "NS"),
    ("get", "services", "NS"),
    ("create", "inferencemodels.modelfleet.io", "NS"),
    ("patch", "inferencemodels.modelfleet.io", "NS"),
    ("delete", "inferencemodels.modelfleet.io", "NS"),
    ("patch", "inferencemodels.modelfleet.io/status", "NS"),
    ("patch", "endpointslices.discovery.k8s.io", "NS"),
    ("create", "events", "NS"),
]
DENIED_TO_OPERATOR = [
    ("delete", "pods", "NS"),
    ("patch", "pods", "NS"),
    ("create", "inferencemodels.modelfleet.io", "NS"),
    ("delete", "inferencemodels.modelfleet.io", "NS"),
    ("create", "serviceaccounts", "NS"),
    ("patch", "events", "NS"),
    ("create", "events.events.k8s.io", "NS"),
    ("get", "endpointslices.discovery.k8s.io", "NS"),
    ("delete", "kopfpeerings.kopf.dev", "NS"),
    ("delete", "clusterkopfpeerings.kopf.dev", ""),
    ("create", "statefulsets.apps", "NS"),
    ("create", "daemonsets.apps", "NS"),
    ("create", "cronjobs.batch", "NS"),
]


@pytest.mark.parametrize(("identity", "denials"), [(ROUTER, DENIED_TO_BOTH + DENIED_TO_ROUTER),
                                                   (OPERATOR, DENIED_TO_BOTH + DENIED_TO_OPERATOR)],
                         ids=["router", "operator"])  # fmt: skip
def test_dangerous_permissions_are_refused(
    cluster: Cluster, rbac: None, namespace: str, identity: Identity, denials: list[tuple[str, str, str]]
) -> None:
    granted = [
        (verb, resource, where)
        for verb, resource, where in denials
        if allowed(cluster, identity, verb, resource, namespace if where == "NS" else where)
    ]
    assert not granted, f"{identity.name} may: {granted}"
    # The same reviews say yes to what the allowlist grants, so a "no" above is not an error.
    assert allowed(cluster, identity, "watch", "inferencemodels.modelfleet.io", "")
    assert allowed(cluster, identity, "list", "inferencemodels.modelfleet.io", namespace)


def test_a_widened_role_is_caught(cluster: Cluster, rbac: None, namespace: str, baseline: Rules) -> None:
    """The checks can fail: bind the built-in `edit` role to the router in one namespace and both see it."""
    binding = client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="too-much"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name="edit"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name=ROUTER.name, namespace=ROUTER.namespace)],
    )
    client.RbacAuthorizationV1Api(cluster.api).create_namespaced_role_binding(namespace, binding)
    extra = can_i_list(cluster, ROUTER, namespace).resources - BASELINE_RESOURCES - ROUTER_ALLOWED
    assert ("secrets", "get") in extra
    assert ("pods/exec", "create") in extra
    assert allowed(cluster, ROUTER, "get", "secrets", namespace)
    # Elsewhere nothing changed.
    assert can_i_list(cluster, ROUTER, "default").resources - BASELINE_RESOURCES == ROUTER_ALLOWED


def test_real_tokens_are_refused_too(cluster: Cluster, router_token: str, namespace: str) -> None:
    """Not only reviews: the router's own bound token reads models and is refused Secrets and writes."""
    with client_with_token(cluster, router_token) as api:
        custom = client.CustomObjectsApi(api)
        custom.list_cluster_custom_object(v1alpha1.GROUP, v1alpha1.VERSION, v1alpha1.PLURAL)
        core = client.CoreV1Api(api)
        model = {
            "apiVersion": f"{v1alpha1.GROUP}/{v1alpha1.VERSION}",
            "kind": v1alpha1.KIND,
            "metadata": {"name": "x"},
            "spec": {"model": "m", "endpoint": {"url": "http://127.0.0.1:1"}},
        }
        for forbidden in (
            core.list_secret_for_all_namespaces,
            lambda: core.read_namespaced_secret("anything", namespace),
            lambda: core.list_namespaced_config_map(namespace),
            lambda: custom.create_namespaced_custom_object(
                v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, model
            ),
            # Only the scale subresource may be patched, and not even read: load and unload need no more.
            lambda: custom.patch_namespaced_custom_object(
                v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, "x", {"spec": {"replicas": 0}}
            ),
            lambda: custom.get_namespaced_custom_object_scale(
                v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, "x"
            ),
        ):
            with pytest.raises(ApiException) as refused:
                forbidden()
            assert refused.value.status == 403


# The chart's RBAC, installed under its own release name -----------------------------------------


@pytest.fixture
def chart_accounts(cluster: Cluster, namespace: str) -> Iterator[dict[str, Identity]]:
    """The chart's ServiceAccounts, ClusterRoles and bindings, applied for a throwaway release (then removed)."""
    release = f"rbac-{uuid.uuid4().hex[:6]}"
    kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    documents = [doc for doc in render(namespace, "--set", f"fullnameOverride={release}") if doc["kind"] in kinds]
    accounts = {doc["metadata"]["name"].removeprefix(f"{release}-"): Identity(namespace, doc["metadata"]["name"])
                for doc in documents if doc["kind"] == "ServiceAccount"}  # fmt: skip
    assert set(accounts) == {"operator", "router"}
    cluster_scoped = [f"{doc['kind'].lower()}/{doc['metadata']['name']}" for doc in documents
                      if doc["kind"].startswith("Cluster")]  # fmt: skip
    try:
        cluster.kubectl("apply", "--server-side", "-f", "-", input_text=yaml.safe_dump_all(documents))
        yield accounts
    finally:
        cluster.kubectl("delete", "--ignore-not-found", "--wait=false", *cluster_scoped)


def test_the_chart_grants_exactly_the_same(
    cluster: Cluster, namespace: str, chart_accounts: dict[str, Identity], baseline: Rules
) -> None:
    """tests/e2e/test_chart.py checks the chart's rules equal manifests/rbac; this checks what they allow."""
    for name, expected in (("router", ROUTER_ALLOWED), ("operator", OPERATOR_ALLOWED)):
        for where in (namespace, "default"):
            rules = can_i_list(cluster, chart_accounts[name], where)
            assert rules.resources - BASELINE_RESOURCES == expected, f"chart {name} in {where}"
        assert not allowed(cluster, chart_accounts[name], "list", "secrets", "")
