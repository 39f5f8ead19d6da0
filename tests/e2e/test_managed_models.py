"""Managed models for real: an InferenceModel becomes an Ollama pod on the real node that answers through the router.

The model comes from the OCI registry on the node's bridge (hack/registry.sh), pushed there with
`ollama push`. The prefetch Job pulls it into a local-path volume, the serving pod loads it from
there, the operator warms each pod up before it may count as Ready, and the router, installed by
the chart on the same node, finds the pod through its EndpointSlice. Downloads are counted at the
registry's blob host, by digest, so "fetched once" is measured, not inferred from Job objects.

The tests run in file order on one release and one model, each starting from what the one before
left, as a user's cluster would.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from kubernetes import client

from tests.e2e.conftest import Cluster, namespace_name_for, wait_for
from tests.support.cluster import BIN_DIR
from tests.support.realnode import (
    BRIDGE_ADDRESS,
    NETWORK,
    NODE_NAME,
    REPO,
    ROLLOUT,
    Release,
    api_key,
    installed_release,
    node_port_url,
    pod_report,
    run,
)

# Each test waits on pods that start for real (the first also on the images and the chart install).
pytestmark = [pytest.mark.e2e, pytest.mark.realnode, pytest.mark.timeout(1800)]

REGISTRY = f"{BRIDGE_ADDRESS}:{NETWORK['registry_port']}"
REGISTRY_MODEL = NETWORK["registry_model"]  # library/gemma3:270m
MODEL = REGISTRY_MODEL.removeprefix("library/")  # what spec.model says: Ollama adds library/ itself
VARIANT = "gemma3-terse:270m"  # the same weights with other parameters: a second model to change to
BLOB_METRICS = f"http://127.0.0.1:{NETWORK['registry_blob_metrics_port']}/metrics"
GROUP, VERSION, PLURAL = "modelfleet.io", "v1alpha1", "inferencemodels"
WARMED_UP = "modelfleet.io/warmed-up"
# Starting a model on two shared cores: download, container start, load and warm-up. Bounds, not goals.
START = 600

# What the closing summary prints: phase timings and bytes downloaded per scenario.
REPORT: dict[str, Any] = {}


# The registry ----------------------------------------------------------------------------------


def blob_bytes() -> dict[str, int]:
    """Body bytes the registry's blob host has sent, by digest, since it started."""
    with urllib.request.urlopen(BLOB_METRICS, timeout=10) as response:
        text = response.read().decode()
    sent = {}
    for match in re.finditer(r'^registry_blobs_sent_bytes_total\{digest="([^"]+)"\} (\d+)', text, re.M):
        sent[match.group(1)] = int(match.group(2))
    return sent


def downloaded_since(before: dict[str, int]) -> dict[str, int]:
    after = blob_bytes()
    return {digest: after[digest] - before.get(digest, 0) for digest in after if after[digest] != before.get(digest)}


@dataclass(frozen=True)
class RegistryModel:
    weights_digest: str
    weights_size: int


@pytest.fixture(scope="module")
def registry_model(real_node: client.V1Node) -> RegistryModel:
    """gemma3:270m in the registry (pushed once; later runs find it there), and a variant of it."""
    run([str(REPO / "hack" / "registry.sh"), "push"], "hack/registry.sh push", timeout=1800)
    run([str(REPO / "hack" / "registry.sh"), "push-variant", VARIANT, "PARAMETER num_predict 24"],
        "hack/registry.sh push-variant", timeout=600)  # fmt: skip
    manifest = registry_manifest(REGISTRY_MODEL)
    (weights,) = [layer for layer in manifest["layers"] if layer["mediaType"] == "application/vnd.ollama.image.model"]
    return RegistryModel(weights_digest=weights["digest"], weights_size=int(weights["size"]))


def registry_manifest(reference: str) -> dict[str, Any]:
    name, tag = reference.rsplit(":", 1)
    request = urllib.request.Request(
        f"http://{REGISTRY}/v2/{name}/manifests/{tag}",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        manifest: dict[str, Any] = json.load(response)
    return manifest


# The stack ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(cluster: Cluster, node_images: list[str], inferencemodel_crd: str) -> Iterator[Release]:
    """The chart on the real node; its operator runs the models of its own namespace, its router finds them."""
    namespace = namespace_name_for("managed")
    yield from installed_release(
        cluster, BIN_DIR / "helm", namespace, extra_args=("--set", f"router.discoveryNamespace={namespace}")
    )
    print("\n".join(f"{key}: {value}" for key, value in REPORT.items()))


def managed_model(name: str, model: str = MODEL, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "runtime": "ollama",
        "model": model,
        "source": {"registry": REGISTRY, "insecure": True},
        "resources": {"gpu": 0, "cpu": "250m", "memory": "1Gi"},
        "scheduling": {
            "nodeSelector": {"modelfleet.io/real-node": "true"},
            "tolerations": [{"key": "modelfleet.io/real-node", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "cache": {"size": "1Gi", "storageClassName": "local-path"},
        "serving": {"maxInFlightPerReplica": 2},
    }
    spec.update(overrides)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceModel", "metadata": {"name": name}, "spec": spec}


def get_model(stack: Release, name: str) -> dict[str, Any]:
    found: dict[str, Any] = client.CustomObjectsApi(stack.cluster.api).get_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, name
    )
    return found


def patch_spec(stack: Release, name: str, spec: dict[str, Any]) -> None:
    client.CustomObjectsApi(stack.cluster.api).patch_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, name, {"spec": spec}
    )


def condition(model: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (model.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def pod_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def ready(stack: Release, name: str, replicas: int = 1) -> bool:
    """The model says it is Ready with `replicas` replicas, and so do its pods (the status may lag them)."""
    model = get_model(stack, name)
    status = model.get("status") or {}
    pods = serving_pods(stack, name)
    return (
        status.get("observedGeneration") == model["metadata"]["generation"]
        and condition(model, "Ready").get("status") == "True"
        and status.get("readyReplicas") == replicas
        and status.get("replicas") == replicas
        and len(pods) == replicas
        and all(pod_ready(pod) for pod in pods)
    )


def wait_ready(stack: Release, name: str, replicas: int = 1, timeout: float = START) -> None:
    try:
        wait_for(lambda: ready(stack, name, replicas), f"{name} to be Ready with {replicas} replica(s)", timeout)
    except AssertionError as exc:
        status = get_model(stack, name).get("status")
        raise AssertionError(f"{exc}\nstatus: {status}\n{pod_report(stack.cluster, stack.namespace)}") from None


def serving_pods(stack: Release, name: str) -> list[Any]:
    """The model's serving pods, but those on their way out (deleted, or ended)."""
    selector = f"modelfleet.io/model={name},app.kubernetes.io/component=model-server"
    pods = client.CoreV1Api(stack.cluster.api).list_namespaced_pod(stack.namespace, label_selector=selector).items
    return [
        pod
        for pod in pods
        if pod.metadata.deletion_timestamp is None and pod.status.phase not in ("Succeeded", "Failed")
    ]


def prefetch_jobs(stack: Release, name: str) -> list[Any]:
    selector = f"modelfleet.io/model={name},app.kubernetes.io/component=model-prefetch"
    jobs: list[Any] = (
        client.BatchV1Api(stack.cluster.api).list_namespaced_job(stack.namespace, label_selector=selector).items
    )
    return jobs


def openai_client(stack: Release) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node_port_url(stack)}/v1", api_key=api_key(stack), max_retries=0, timeout=120)


def streamed_chat(stack: Release, prompt: str, max_tokens: int = 24) -> str:
    stream = openai_client(stack).chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


# Ollama's request log: [GIN] 2026/11/30 - 22:59:01 | 200 |  1.2s |  10.244.0.15 | POST  "/api/chat"
GIN_LINE = re.compile(r"\[GIN\].*\|\s*(\d{3})\s*\|[^|]*\|\s*([0-9a-f.:]+)\s*\|\s*(\w+)\s+\"([^\"]+)\"")


def model_requests(stack: Release, pod: str) -> list[tuple[str, str]]:
    """(client address, path) of every generation request in a serving pod's Ollama log, in order."""
    log = stack.cluster.kubectl("-n", stack.namespace, "logs", pod).stdout
    return [
        (match.group(2), match.group(4))
        for match in map(GIN_LINE.search, log.splitlines())
        if match and match.group(4) in ("/api/chat", "/api/generate")
    ]


@dataclass
class ChatLoop:
    """Short chats through the router, one after another, until stopped; every failure is kept."""

    stack: Release
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def run(self) -> None:
        chat = openai_client(self.stack)
        while not self.stop.is_set():
            try:
                answer = chat.chat.completions.create(
                    model="gemma", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
                )
                if answer.choices:
                    self.answered += 1
                else:
                    self.failures.append(f"no choices: {answer}")
            except Exception as exc:  # every failure counts, whatever its kind
                self.failures.append(repr(exc))
            # Under the chart's default rate limit of 100 requests per key and minute.
            self.stop.wait(0.8)

    def __enter__(self) -> ChatLoop:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.answered >= 2 or bool(self.failures), "the chat loop's first answers", timeout=120)
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=150)


# The tests ---------------------------------------------------------------------------------------


def test_a_managed_model_is_prefetched_served_and_streams_through_the_router(
    stack: Release, registry_model: RegistryModel
) -> None:
    before = blob_bytes()
    started = time.monotonic()
    client.CustomObjectsApi(stack.cluster.api).create_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, managed_model("gemma")
    )
    wait_ready(stack, "gemma")
    REPORT["apply to Ready (s)"] = round(time.monotonic() - started, 1)
    model = get_model(stack, "gemma")
    REPORT["status.timings, first start"] = model["status"].get("timings")

    # The prefetch Job pulled the weights from the registry into the volume, once, on the real node.
    (job,) = prefetch_jobs(stack, "gemma")
    assert job.status.succeeded == 1, job.status
    downloaded = downloaded_since(before)
    assert downloaded.get(registry_model.weights_digest) == registry_model.weights_size, downloaded
    REPORT["bytes downloaded, first start"] = sum(downloaded.values())
    assert condition(model, "ModelCached")["reason"] == "Prefetched"

    # The serving pod is a real container on the real node that loaded the weights from the claim.
    (pod,) = serving_pods(stack, "gemma")
    assert pod.spec.node_name == NODE_NAME
    assert pod.status.container_statuses[0].container_id.startswith("containerd://")
    (volume,) = [v for v in pod.spec.volumes if v.name == "model-cache"]
    assert volume.persistent_volume_claim.claim_name == "im-gemma-cache"
    log = stack.cluster.kubectl("-n", stack.namespace, "logs", pod.metadata.name).stdout
    assert f"/models/ollama/blobs/sha256-{registry_model.weights_digest.removeprefix('sha256:')}" in log, log[-3000:]

    # It became Ready only through the warm-up: the operator's generation is its first request.
    gate = next(c for c in pod.status.conditions if c.type == WARMED_UP)
    assert (gate.status, gate.reason) == ("True", "WarmedUp"), gate
    operator_ips = {p.status.pod_ip for p in stack.pods("operator")}
    first_address, first_path = model_requests(stack, pod.metadata.name)[0]
    assert (first_address in operator_ips, first_path) == (True, "/api/generate"), (first_address, operator_ips)
    assert model["status"]["timings"].get("warmupSeconds") is not None, model["status"]

    # The router's pods found the pod through the EndpointSlice, and the official SDK streams a chat.
    slices = client.DiscoveryV1Api(stack.cluster.api).list_namespaced_endpoint_slice(
        stack.namespace, label_selector="kubernetes.io/service-name=im-gemma"
    )
    addresses = [a for s in slices.items for e in s.endpoints or [] if e.conditions.ready for a in e.addresses]
    assert addresses == [pod.status.pod_ip]
    text = streamed_chat(stack, "The capital of France is")
    assert text.strip(), "an empty answer"
    REPORT["first streamed answer"] = text.strip()[:80]
    assert model["status"]["servedModel"] == MODEL


def test_a_restart_a_second_replica_and_an_operator_restart_download_nothing(
    stack: Release, registry_model: RegistryModel
) -> None:
    before = blob_bytes()
    core = client.CoreV1Api(stack.cluster.api)
    (first,) = serving_pods(stack, "gemma")
    core.delete_namespaced_pod(first.metadata.name, stack.namespace)
    wait_for(lambda: {p.metadata.name for p in serving_pods(stack, "gemma")} - {first.metadata.name} != set(),
             "a replacement pod", timeout=120)  # fmt: skip
    wait_ready(stack, "gemma")
    assert downloaded_since(before) == {}, "a restarted pod downloaded weights again"

    # A second replica, under load through the router: no request reaches it before its warm-up.
    existing = {p.metadata.name for p in serving_pods(stack, "gemma")}
    with ChatLoop(stack) as loop:
        patch_spec(stack, "gemma", {"replicas": 2})
        wait_ready(stack, "gemma", replicas=2)
        (new,) = [p for p in serving_pods(stack, "gemma") if p.metadata.name not in existing]
        # Keep going until the router has sent the new pod some of the load.
        router_ips = {p.status.pod_ip for p in stack.pods("router")}
        wait_for(lambda: any(a in router_ips for a, _ in model_requests(stack, new.metadata.name)),
                 "the router to send the new replica requests", timeout=120)  # fmt: skip
    assert loop.failures == [], loop.failures[:5]
    requests = model_requests(stack, new.metadata.name)
    operator_ips = {p.status.pod_ip for p in stack.pods("operator")}
    assert requests[0][0] in operator_ips, f"the new pod's first request came from {requests[0][0]}: {requests[:3]}"
    assert requests[0][1] == "/api/generate"
    assert downloaded_since(before) == {}, "a second replica downloaded weights again"

    # The operator restarts: it finds the Job and the volume as they are, and fetches nothing.
    jobs_before = {j.metadata.name for j in prefetch_jobs(stack, "gemma")}
    active = stack.fullname + "-operator-0"
    old_uid = core.read_namespaced_pod(active, stack.namespace).metadata.uid
    core.delete_namespaced_pod(active, stack.namespace)

    def restarted_and_reconciled() -> bool:
        pod = core.read_namespaced_pod(active, stack.namespace)
        if pod.metadata.uid == old_uid or pod.status.phase != "Running":
            return False
        # Kopf prefixes each model's messages with [namespace/name]: the new process handled gemma.
        log = stack.cluster.kubectl("-n", stack.namespace, "logs", active).stdout
        return f"[{stack.namespace}/gemma]" in log

    wait_for(restarted_and_reconciled, "the restarted operator to reconcile the model", timeout=ROLLOUT)
    patch_spec(stack, "gemma", {"replicas": 1})
    wait_ready(stack, "gemma", replicas=1)
    assert {j.metadata.name for j in prefetch_jobs(stack, "gemma")} == jobs_before
    assert downloaded_since(before) == {}, "an operator restart downloaded weights again"
    REPORT["bytes downloaded: pod restart, second replica, operator restart"] = 0


def test_a_new_volume_is_filled_again_and_a_filled_one_is_not(stack: Release, registry_model: RegistryModel) -> None:
    core = client.CoreV1Api(stack.cluster.api)

    def claim(name: str) -> None:
        core.create_namespaced_persistent_volume_claim(stack.namespace, {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local-path",
                     "resources": {"requests": {"storage": "1Gi"}}}})  # fmt: skip

    def switch_to(existing: str | None) -> dict[str, int]:
        before = blob_bytes()
        cache = {"size": "1Gi", "storageClassName": "local-path", "existingClaim": existing}
        patch_spec(stack, "gemma", {"cache": cache})
        wait_for(lambda: all(v.persistent_volume_claim.claim_name == (existing or "im-gemma-cache")
                             for p in serving_pods(stack, "gemma") for v in p.spec.volumes
                             if v.name == "model-cache") and ready(stack, "gemma"),
                 f"the pods to serve from {existing or 'im-gemma-cache'}", timeout=START)  # fmt: skip
        return downloaded_since(before)

    claim("weights-b")
    # Another claim: empty, so the weights are fetched into it before the pods move there.
    moved = switch_to("weights-b")
    assert moved.get(registry_model.weights_digest) == registry_model.weights_size, moved
    REPORT["bytes downloaded: another existingClaim"] = sum(moved.values())
    # Back to the operator's own claim, which still holds the weights: a Job runs, nothing is fetched.
    back = switch_to(None)
    assert back.get(registry_model.weights_digest, 0) == 0, back
    REPORT["bytes downloaded: back to a filled claim"] = sum(back.values())
    # The same claim name, deleted and created again, is a new, empty volume: fetched again.
    core.delete_namespaced_persistent_volume_claim("weights-b", stack.namespace)
    wait_for(lambda: "weights-b" not in {c.metadata.name for c in
                                         core.list_namespaced_persistent_volume_claim(stack.namespace).items},
             "the old weights-b to be gone", timeout=120)  # fmt: skip
    claim("weights-b")
    again = switch_to("weights-b")
    assert again.get(registry_model.weights_digest) == registry_model.weights_size, again
    REPORT["bytes downloaded: a claim deleted and recreated"] = sum(again.values())
    switch_to(None)


def test_changing_the_model_keeps_answering_until_the_new_one_is_ready(
    stack: Release, registry_model: RegistryModel
) -> None:
    before = blob_bytes()
    apps = client.AppsV1Api(stack.cluster.api)
    old_sets = {rs.metadata.name for rs in apps.list_namespaced_replica_set(stack.namespace).items}
    with ChatLoop(stack) as loop:
        patch_spec(stack, "gemma", {"model": VARIANT})
        wait_for(lambda: get_model(stack, "gemma")["status"].get("servedModel") == VARIANT,
                 "the router's name for the model to follow the new pods", timeout=START)  # fmt: skip
        answered_at_switch = loop.answered
        wait_for(lambda: loop.answered >= answered_at_switch + 3 or bool(loop.failures),
                 "answers from the new model", timeout=120)  # fmt: skip
    assert loop.failures == [], (
        f"{len(loop.failures)} failed of {loop.answered + len(loop.failures)}: {loop.failures[:5]}"
    )
    wait_ready(stack, "gemma")
    # The new weights were fetched first, then the pods rolled.
    (job,) = prefetch_jobs(stack, "gemma")
    assert job.metadata.annotations["modelfleet.io/prefetch-model"] == VARIANT
    (new_set,) = [rs for rs in apps.list_namespaced_replica_set(stack.namespace).items
                  if rs.metadata.name not in old_sets and rs.metadata.name.startswith("im-gemma-")]  # fmt: skip
    assert job.status.completion_time <= new_set.metadata.creation_timestamp, (job.status, new_set.metadata)
    (pod,) = serving_pods(stack, "gemma")
    assert pod.metadata.annotations["modelfleet.io/served-model"] == VARIANT
    REPORT["bytes downloaded: model change (same weights, new parameters)"] = sum(downloaded_since(before).values())
    REPORT["requests answered during the model change"] = loop.answered


def test_a_pod_killed_mid_stream_ends_the_stream_with_an_error_and_is_replaced_from_the_cache(
    stack: Release, registry_model: RegistryModel
) -> None:
    before = blob_bytes()
    (pod,) = serving_pods(stack, "gemma")
    stream = openai_client(stack).chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Tell a long story about a lighthouse."}],
        max_tokens=400, stream=True,
    )  # fmt: skip
    received: list[Any] = []

    def read_and_kill() -> None:
        for chunk in stream:
            received.append(chunk)
            if len(received) == 3:
                client.CoreV1Api(stack.cluster.api).delete_namespaced_pod(
                    pod.metadata.name, stack.namespace, grace_period_seconds=0
                )

    # The official SDK raises on the stream's error event.
    with pytest.raises(openai.APIError) as broken:
        read_and_kill()
    assert len(received) >= 3
    assert "mid-stream" in str(broken.value), broken.value
    wait_for(lambda: any(p.metadata.name != pod.metadata.name for p in serving_pods(stack, "gemma")),
             "a replacement pod", timeout=120)  # fmt: skip
    wait_ready(stack, "gemma")
    assert downloaded_since(before) == {}, "the replacement downloaded weights again"
    assert streamed_chat(stack, "The sea is").strip()


def test_a_model_the_registry_does_not_have_fails_once_with_a_status_that_says_what_to_fix(stack: Release) -> None:
    client.CustomObjectsApi(stack.cluster.api).create_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, managed_model("ghost", model="no-such-model:1b")
    )
    wait_for(lambda: condition(get_model(stack, "ghost"), "ModelCached").get("reason") == "PrefetchFailed",
             "the prefetch to fail", timeout=START)  # fmt: skip
    model = get_model(stack, "ghost")
    message = condition(model, "Ready")["message"]
    assert f"the registry has no model {REGISTRY}/library/no-such-model:1b" in message, message
    assert "check spec.model and spec.source.registry" in message, message
    assert model["status"]["phase"] == "Failed"
    # One attempt: the pod failure policy failed the Job at once, with no retries.
    (job,) = prefetch_jobs(stack, "ghost")
    assert (job.status.failed, job.status.succeeded) == (1, None), job.status
    assert [c.reason for c in job.status.conditions if c.type == "Failed"] == ["PodFailurePolicy"]
    assert serving_pods(stack, "ghost") == [], "no serving pods without weights"
    events = stack.cluster.kubectl("-n", stack.namespace, "get", "events", "--field-selector",
                                   "involvedObject.name=ghost", "-o", "jsonpath={.items[*].reason}").stdout  # fmt: skip
    assert "PrefetchFailed" in events.split(), events
    client.CustomObjectsApi(stack.cluster.api).delete_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, "ghost"
    )


def test_a_memory_limit_below_what_the_model_needs_shows_as_oom_killed(stack: Release) -> None:
    small = managed_model("tiny", resources={"gpu": 0, "cpu": "250m", "memory": "128Mi"})
    client.CustomObjectsApi(stack.cluster.api).create_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, small
    )
    # Under a cgroup v1 limit (this node) the kernel kills Ollama's runner, a child process, not the
    # container: the engine reports a failed load, and the status says that memory is the likely cause.
    wait_for(lambda: condition(get_model(stack, "tiny"), "Degraded").get("reason") in ("OOMKilled", "OutOfMemory"),
             "the model to show that it ran out of memory", timeout=START)  # fmt: skip
    model = get_model(stack, "tiny")
    degraded = condition(model, "Degraded")
    assert degraded["status"] == "True"
    assert "128Mi" in degraded["message"], degraded
    assert "raise spec.resources.memory" in degraded["message"], degraded
    assert model["status"]["phase"] == "Failed"
    assert model["status"].get("readyReplicas") == 0
    # The kernel's own record: the pod's memory cgroup counted an OOM kill.
    (pod,) = serving_pods(stack, "tiny")
    assert oom_kills(pod.metadata.uid) > 0
    client.CustomObjectsApi(stack.cluster.api).delete_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, "tiny"
    )


def oom_kills(pod_uid: str) -> int:
    """The most OOM kills any memory cgroup of the pod (the pod's or a container's) has counted.

    cgroup v1 counts them in memory.oom_control, per cgroup; v2 in memory.events, hierarchically.
    """
    counts = [0]
    for pattern in (f"*{pod_uid}*", f"*{pod_uid.replace('-', '_')}*"):
        for pod_dir in Path("/sys/fs/cgroup").glob(f"**/kubepods*/**/{pattern}"):
            for name in ("memory.oom_control", "memory.events"):
                for found in [pod_dir / name, *pod_dir.glob(f"*/{name}")]:
                    if found.is_file():
                        counts += [int(line.split()[1]) for line in found.read_text().splitlines()
                                   if line.startswith("oom_kill ")]  # fmt: skip
    return max(counts)
