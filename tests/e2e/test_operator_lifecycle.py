"""The operator is quiet in steady state, and converges without duplicates after being killed."""

from __future__ import annotations

import json
import signal
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from modelfleet.api import v1alpha1
from tests.e2e.conftest import OPERATOR_ACCOUNT, OPERATOR_NAMESPACE, Cluster, start_operator, wait_for
from tests.support.cluster import OPERATOR_AUDIT_LOG

pytestmark = pytest.mark.e2e

SELECTOR = "app.kubernetes.io/managed-by=modelfleet-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"


def model(name: str) -> dict[str, object]:
    return {
        "apiVersion": f"{v1alpha1.GROUP}/{v1alpha1.VERSION}",
        "kind": v1alpha1.KIND,
        "metadata": {"name": name},
        "spec": {"runtime": "ollama", "model": f"{name}:latest", "resources": {"gpu": 0, "cpu": "1"}},
    }


def resource_versions(cluster: Cluster, namespace: str) -> dict[str, str]:
    """resourceVersion of every model and every child: any write changes one of them."""
    versions: dict[str, str] = {}
    apps, core, batch = client.AppsV1Api(cluster.api), client.CoreV1Api(cluster.api), client.BatchV1Api(cluster.api)
    listings = {
        "deployment": apps.list_namespaced_deployment(namespace, label_selector=SELECTOR).items,
        "service": core.list_namespaced_service(namespace, label_selector=SELECTOR).items,
        "pvc": core.list_namespaced_persistent_volume_claim(namespace, label_selector=SELECTOR).items,
        "job": batch.list_namespaced_job(namespace, label_selector=SELECTOR).items,
        "networkpolicy": client.NetworkingV1Api(cluster.api)
        .list_namespaced_network_policy(namespace, label_selector=SELECTOR)
        .items,
    }
    for kind, items in listings.items():
        for item in items:
            versions[f"{kind}/{item.metadata.name}"] = item.metadata.resource_version
    models = client.CustomObjectsApi(cluster.api).list_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL
    )
    for item in models["items"]:
        versions[f"im/{item['metadata']['name']}"] = item["metadata"]["resourceVersion"]
    return versions


def operator_metric(metrics_url: str, sample_name: str, **labels: str) -> float:
    """One of the live operator's counters (summed over other labels); a dead operator raises instead."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def reconciles(metrics_url: str, trigger: str) -> float:
    return operator_metric(metrics_url, "modelfleet_operator_reconciles_total", trigger=trigger)


def all_ready(cluster: Cluster, namespace: str, names: list[str]) -> bool:
    api = client.CustomObjectsApi(cluster.api)
    for name in names:
        body = api.get_namespaced_custom_object(v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, name)
        conditions = {c["type"]: c["status"] for c in (body.get("status") or {}).get("conditions") or []}
        if conditions.get("Ready") != "True" or conditions.get("Progressing") != "False":
            return False
    return True


def api_requests(metrics_url: str, verb: str) -> float:
    return operator_metric(metrics_url, "modelfleet_operator_api_requests_total", verb=verb)


def requests_by_resource(metrics_url: str, verb: str) -> dict[str, float]:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return {
        sample.labels["resource"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "modelfleet_operator_api_requests_total" and sample.labels.get("verb") == verb
    }


WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
READ_VERBS = {"get", "list"}


class AuditTail:
    """The API server's record of the operator account's requests, from the moment it was made on.

    The operator's own counters see only the requests of its own client; this sees every request its
    process sends, Kopf's included, as the API server received it."""

    def __init__(self, path: Path = OPERATOR_AUDIT_LOG) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def requests(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as log:
            log.seek(self.offset)
            lines = log.read().splitlines()
        return [event for event in map(json.loads, lines) if event.get("user", {}).get("username") == OPERATOR_USER]


def by_verb(events: list[dict[str, Any]]) -> Counter[str]:
    return Counter(event["verb"] for event in events)


def described(events: list[dict[str, Any]]) -> list[str]:
    return [f"{event['verb']} {event.get('requestURI')}" for event in events[:10]]


def test_steady_state_reconciles_and_sends_nothing(
    cluster: Cluster, inferencemodel_crd: str, namespace: str, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    names = ["quiet-a", "quiet-b"]
    # Only this namespace: models other tests left behind (in namespaces being deleted) are not steady.
    since_start = AuditTail()
    servers = start_operator(cluster, tmp_path, resync_seconds=5, namespaces=[namespace])
    operator = next(servers)
    try:
        api = client.CustomObjectsApi(cluster.api)
        for name in names:
            api.create_namespaced_custom_object(
                v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, model(name)
            )
        wait_for(lambda: all_ready(cluster, namespace, names), what="both models Ready and stable", timeout=90)
        # Let the last status patch and the child events it caused settle: two full resyncs of both
        # models after Ready.
        settled = reconciles(operator.metrics_url, "resync") + 2 * len(names)
        wait_for(lambda: reconciles(operator.metrics_url, "resync") >= settled, what="the models to settle",
                 timeout=60)  # fmt: skip
        before = resource_versions(cluster, namespace)
        steady = AuditTail()
        resyncs_before = reconciles(operator.metrics_url, "resync")
        failures_before = operator_metric(operator.metrics_url, "modelfleet_operator_reconcile_errors_total")
        patches_before = api_requests(operator.metrics_url, "patch")
        patched_before = requests_by_resource(operator.metrics_url, "patch")
        reads_before = api_requests(operator.metrics_url, "get") + api_requests(operator.metrics_url, "list")
        # Quiet must mean "reconciled and found nothing to change", not "did nothing": wait for
        # ten more resyncs of each model (the counter is read from the live operator, so a dead or
        # stuck operator fails here rather than passing as quiet).
        wanted = resyncs_before + 10 * len(names)
        wait_for(lambda: reconciles(operator.metrics_url, "resync") >= wanted,
                 what=f"{10 * len(names)} resync reconciles", timeout=180)  # fmt: skip
        after = resource_versions(cluster, namespace)
        resyncs = reconciles(operator.metrics_url, "resync") - resyncs_before
        failures = operator_metric(operator.metrics_url, "modelfleet_operator_reconcile_errors_total") - failures_before
        patches = api_requests(operator.metrics_url, "patch") - patches_before
        patched = {resource: count - patched_before.get(resource, 0)
                   for resource, count in requests_by_resource(operator.metrics_url, "patch").items()}  # fmt: skip
        reads = api_requests(operator.metrics_url, "get") + api_requests(operator.metrics_url, "list") - reads_before
        steady_requests = steady.requests()
        assert operator.process.process.poll() is None, "the operator exited"
    finally:
        servers.close()
    # The audit log does see the operator: it applied (server-side apply: PATCH) the children of both models.
    applied = [
        e for e in since_start.requests() if e["verb"] == "patch" and e["objectRef"].get("namespace") == namespace
    ]
    assert {e["objectRef"]["resource"] for e in applied} >= {"deployments", "services"}, described(applied)
    changed = sorted(key for key in before if after.get(key) != before[key])
    record_property("steady_state_resync_reconciles", resyncs)
    record_property("steady_state_writes", len(changed))
    record_property("steady_state_patch_requests", patches)
    record_property("steady_state_reads_per_resync", round(reads / resyncs, 1))
    print(f"steady state: {resyncs:.0f} resyncs, {patches:.0f} PATCH requests, {reads / resyncs:.1f} reads per resync")
    assert resyncs >= 10 * len(names)
    assert failures == 0, "a reconcile that fails writes nothing, but is not quiet"
    # Each model and its Deployment, Service, cache claim, prefetch Job and NetworkPolicy. (An HPA or a
    # PDB, whose status other controllers write, is covered by the audit log's count of every write.)
    assert len(before) == 5 * len(names) + len(names), sorted(before)
    assert changed == [], f"objects written in steady state: {changed}"
    # Not only nothing stored: nothing sent.  An apply that would change nothing is skipped, and a
    # resync reads the model and its children from what the watches have seen.
    assert patches == 0, f"{patches:.0f} PATCH requests in steady state: {patched}"
    assert reads == 0, f"{reads:.0f} GET and LIST requests in {resyncs:.0f} resyncs"
    # And by the API server's count, every request of the operator's process (Kopf's too): no write of any
    # verb, and no read of the models or their children; only watches, and Kopf's own listing of the
    # namespaces it serves (its namespace observer re-lists them while it watches a list of namespaces).
    verbs = by_verb(steady_requests)
    record_property("steady_state_audited_requests", dict(verbs))
    print(f"steady state, by the API server's audit log: {dict(verbs) or 'no request'}")
    writes = [e for e in steady_requests if e["verb"] in WRITE_VERBS]
    assert writes == [], f"{len(writes)} writes in steady state: {described(writes)}"
    reads = [e for e in steady_requests if e["verb"] in READ_VERBS and e["objectRef"].get("resource") != "namespaces"]
    assert reads == [], f"{len(reads)} reads in steady state: {described(reads)}"


def test_killed_mid_reconcile_the_operator_converges_without_duplicates(
    cluster: Cluster, inferencemodel_crd: str, namespace: str, tmp_path: Path
) -> None:
    names = [f"churn-{i}" for i in range(6)]
    (tmp_path / "first").mkdir()
    first = start_operator(cluster, tmp_path / "first", resync_seconds=5)
    running = next(first)
    api = client.CustomObjectsApi(cluster.api)
    for name in names:
        api.create_namespaced_custom_object(v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, model(name))
    # Kill it hard while it is working through the new models.
    wait_for(
        lambda: bool(client.CoreV1Api(cluster.api).list_namespaced_service(namespace, label_selector=SELECTOR).items),
        what="the first children",
        timeout=30,
        interval=0.05,
    )
    running.process.process.send_signal(signal.SIGKILL)
    running.process.process.wait(timeout=10)
    first.close()

    (tmp_path / "second").mkdir()
    second = start_operator(cluster, tmp_path / "second", resync_seconds=5)
    next(second)
    try:
        wait_for(lambda: all_ready(cluster, namespace, names), what="every model Ready after the restart", timeout=120)
    finally:
        second.close()
    per_kind = Counter(key.split("/")[0] for key in resource_versions(cluster, namespace))
    assert per_kind == {"im": 6, "deployment": 6, "service": 6, "pvc": 6, "job": 6, "networkpolicy": 6}


def test_peering_mode_reconciles_and_records_its_heartbeat(
    cluster: Cluster, inferencemodel_crd: str, namespace: str, tmp_path: Path
) -> None:
    """With Kopf peering (the HA mode), the operator announces itself in ClusterKopfPeering/modelfleet."""
    peering = Path(__file__).resolve().parents[2] / "manifests" / "kopf-peering.yaml"
    # The file holds the CRDs and an object of one of them: the object needs the CRDs established first.
    cluster.kubectl("apply", "--server-side", "-f", str(peering), check=False)
    cluster.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=30s")
    cluster.kubectl("apply", "--server-side", "-f", str(peering))
    servers = start_operator(cluster, tmp_path, resync_seconds=5, standalone=False, priority=100)
    next(servers)
    try:
        client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(
            v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, model("peered")
        )
        wait_for(lambda: all_ready(cluster, namespace, ["peered"]), what="Ready under peering", timeout=90)
        heartbeat = client.CustomObjectsApi(cluster.api).get_cluster_custom_object(
            "kopf.dev", "v1", "clusterkopfpeerings", "modelfleet"
        )
        peers = heartbeat.get("status") or {}
        assert any(peer.get("priority") == 100 for peer in peers.values()), peers
    finally:
        servers.close()
