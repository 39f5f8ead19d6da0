"""The operator killed five times (SIGKILL, as a node loss or OOM would) during a churn of 50
InferenceModels: creates, spec changes and deletes, some made while it is down.  Once it runs
again it converges: every model reconciled at its latest generation, exactly one of each child
per model, the children reflect the latest spec, and nothing is left of deleted models."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from modelfleet.api import v1alpha1
from tests.e2e.conftest import Cluster, OperatorProcess, start_operator, wait_for

pytestmark = pytest.mark.e2e

SELECTOR = "app.kubernetes.io/managed-by=modelfleet-operator"
MODELS = 50
KILLS = 5


def model(name: str, cpu: str, replicas: int) -> dict[str, object]:
    return {
        "apiVersion": f"{v1alpha1.GROUP}/{v1alpha1.VERSION}",
        "kind": v1alpha1.KIND,
        "metadata": {"name": name},
        "spec": {"runtime": "ollama", "model": f"{name}:latest", "replicas": replicas,
                 "resources": {"gpu": 0, "cpu": cpu}},
    }  # fmt: skip


class Churn:
    """The test's own record of what each model should be, and the API calls that change them."""

    def __init__(self, cluster: Cluster, namespace: str, seed: int) -> None:
        self.api = client.CustomObjectsApi(cluster.api)
        self.namespace = namespace
        self.random = random.Random(seed)
        self.wanted: dict[str, tuple[str, int]] = {}  # name -> (cpu, replicas)
        self.deleted: set[str] = set()
        self.created = 0

    def create(self, count: int) -> None:
        for _ in range(count):
            name = f"churn-{self.created:03d}"
            self.created += 1
            self.wanted[name] = ("100m", 1)
            self.api.create_namespaced_custom_object(
                v1alpha1.GROUP, v1alpha1.VERSION, self.namespace, v1alpha1.PLURAL, model(name, "100m", 1)
            )

    def update(self, count: int) -> None:
        for name in self.random.sample(sorted(self.wanted), min(count, len(self.wanted))):
            cpu, replicas = self.wanted[name]
            wanted = ("200m" if cpu == "100m" else "100m", 1 + (replicas % 2))
            self.wanted[name] = wanted
            self.api.patch_namespaced_custom_object(
                v1alpha1.GROUP, v1alpha1.VERSION, self.namespace, v1alpha1.PLURAL, name,
                {"spec": {"replicas": wanted[1], "resources": {"gpu": 0, "cpu": wanted[0]}}},
            )  # fmt: skip

    def delete(self, count: int) -> None:
        for name in self.random.sample(sorted(self.wanted), min(count, len(self.wanted))):
            del self.wanted[name]
            self.deleted.add(name)
            self.api.delete_namespaced_custom_object(
                v1alpha1.GROUP, v1alpha1.VERSION, self.namespace, v1alpha1.PLURAL, name
            )


def children(cluster: Cluster, namespace: str) -> dict[str, list[Any]]:
    apps, core = client.AppsV1Api(cluster.api), client.CoreV1Api(cluster.api)
    batch, networking = client.BatchV1Api(cluster.api), client.NetworkingV1Api(cluster.api)
    return {
        "deployment": apps.list_namespaced_deployment(namespace, label_selector=SELECTOR).items,
        "service": core.list_namespaced_service(namespace, label_selector=SELECTOR).items,
        "pvc": core.list_namespaced_persistent_volume_claim(namespace, label_selector=SELECTOR).items,
        "job": batch.list_namespaced_job(namespace, label_selector=SELECTOR).items,
        "networkpolicy": networking.list_namespaced_network_policy(namespace, label_selector=SELECTOR).items,
    }


def divergence(cluster: Cluster, namespace: str, churn: Churn) -> list[str]:
    """Everything that differs from the converged state; empty once the operator has caught up."""
    problems: list[str] = []
    listed = client.CustomObjectsApi(cluster.api).list_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL
    )["items"]
    models = {item["metadata"]["name"]: item for item in listed}
    if set(models) != set(churn.wanted):
        problems.append(f"models {sorted(set(models) ^ set(churn.wanted))} differ from the churn's record")
    uid_to_name = {item["metadata"]["uid"]: name for name, item in models.items()}
    for name, item in models.items():
        status = item.get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        ready = conditions.get("Ready", {}).get("status")
        if status.get("observedGeneration") != item["metadata"]["generation"] or ready != "True":
            observed = status.get("observedGeneration")
            reason = conditions.get("Ready", {}).get("reason")
            problems.append(
                f"{name}: generation {item['metadata']['generation']}, observed {observed}, Ready {ready} ({reason})"
            )
    for kind, items in children(cluster, namespace).items():
        owners: Counter[str] = Counter()
        for child in items:
            refs = [ref for ref in child.metadata.owner_references or [] if ref.controller]
            owner = uid_to_name.get(refs[0].uid) if refs else None
            if owner is None:
                problems.append(f"orphan {kind}/{child.metadata.name}")
                continue
            owners[owner] += 1
            if kind == "deployment":
                cpu, replicas = churn.wanted.get(owner, ("?", 0))
                container = child.spec.template.spec.containers[0]
                if (container.resources.requests or {}).get("cpu") != cpu or child.spec.replicas != replicas:
                    requested = (container.resources.requests or {}).get("cpu")
                    problems.append(f"deployment/{child.metadata.name} is stale: {requested}/{child.spec.replicas}, "
                                    f"want {cpu}/{replicas}")  # fmt: skip
        for name in models:
            expected = {1}  # the prefetch Job stays: a completed one means "the weights are on this volume"
            if owners[name] not in expected:
                problems.append(f"{name} has {owners[name]} {kind}s")
    return problems


def operator_until_killed(
    cluster: Cluster, work_dir: Path, round_number: int
) -> tuple[Iterator[OperatorProcess], OperatorProcess]:
    directory = work_dir / f"operator-{round_number}"
    directory.mkdir()
    servers = start_operator(cluster, directory, resync_seconds=5)
    return servers, next(servers)


def kill(servers: Iterator[OperatorProcess], running: OperatorProcess) -> None:
    running.process.process.send_signal(signal.SIGKILL)
    running.process.process.wait(timeout=10)
    servers.close()  # type: ignore[attr-defined]


def test_killed_five_times_during_a_churn_of_50_models_the_operator_converges(
    cluster: Cluster, inferencemodel_crd: str, namespace: str, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    churn = Churn(cluster, namespace, seed=8)
    # Each round: changes while the operator works, a kill at a random moment, changes while it is down.
    rounds = [
        (lambda: churn.create(MODELS), lambda: churn.update(5)),
        (lambda: churn.update(10), lambda: churn.delete(5)),
        (lambda: (churn.create(5), churn.delete(3)), lambda: churn.update(10)),
        (lambda: churn.update(15), lambda: (churn.delete(4), churn.create(3))),
        (lambda: churn.delete(5), lambda: churn.update(10)),
    ]
    assert len(rounds) == KILLS
    kill_delays = []
    for number, (while_running, while_down) in enumerate(rounds):
        servers, running = operator_until_killed(cluster, tmp_path, number)
        while_running()
        delay = churn.random.uniform(0.5, 4.0)
        kill_delays.append(round(delay, 1))
        time.sleep(delay)
        assert running.process.process.poll() is None, f"the operator died by itself:\n{running.process.log_tail()}"
        kill(servers, running)
        while_down()

    servers, running = operator_until_killed(cluster, tmp_path, KILLS)
    started = time.monotonic()
    try:
        last: list[str] = []

        def caught_up() -> bool:
            nonlocal last
            try:
                last = divergence(cluster, namespace, churn)
            except ApiException as exc:
                last = [f"listing failed: {exc.status}"]
            return not last

        try:
            wait_for(caught_up, what="convergence after the fifth restart", timeout=240, interval=1.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; still diverging: {last[:10]} ({len(last)} in all)") from None
        converged_after = time.monotonic() - started
        log = "\n".join(
            (tmp_path / f"operator-{n}" / "operator.log").read_text(errors="replace") for n in range(KILLS + 1)
        )
    finally:
        servers.close()  # type: ignore[attr-defined]
    record_property("churn_converged_seconds", round(converged_after, 1))
    print(
        f"\nchurn: {churn.created} created, {len(churn.deleted)} deleted, {len(churn.wanted)} remain; killed after "
        f"{kill_delays} s; converged {converged_after:.1f} s after the last restart"
    )
    print(f"tracebacks in the operators' logs: {log.count('Traceback')}")
