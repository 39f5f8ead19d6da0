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

import contextlib
import itertools
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from kubernetes import client

from tests.e2e.conftest import Cluster, namespace_name_for, wait_for
from tests.support.cluster import BIN_DIR
from tests.support.managed import (
    GROUP,
    MODEL,
    PLURAL,
    REGISTRY,
    START,
    VARIANT,
    VERSION,
    RegistryModel,
    assert_warmed_up_before_any_routed_request,
    blob_bytes,
    chat_loop,
    condition,
    downloaded_since,
    get_model,
    managed_model,
    model_requests,
    openai_client,
    patch_spec,
    prefetch_jobs,
    ready,
    serving_pods,
    streamed_chat,
    wait_ready,
)
from tests.support.realnode import (
    BRIDGE_ADDRESS,
    CHART,
    NETWORK,
    NODE_NAME,
    ROLLOUT,
    Release,
    api_key,
    installed_release,
    node_port_url,
)

# Each test waits on pods that start for real (the first also on the images and the chart install).
pytestmark = [pytest.mark.e2e, pytest.mark.realnode, pytest.mark.timeout(1800)]

# What the closing summary prints: phase timings and bytes downloaded per scenario.
REPORT: dict[str, Any] = {}


# The stack ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(cluster: Cluster, node_images: list[str], inferencemodel_crd: str) -> Iterator[Release]:
    """The chart on the real node; its operator runs the models of its own namespace, its router finds them."""
    namespace = namespace_name_for("managed")
    yield from installed_release(
        cluster, BIN_DIR / "helm", namespace, extra_args=("--set", f"router.discoveryNamespace={namespace}")
    )
    print("\n".join(f"{key}: {value}" for key, value in REPORT.items()))


# The tests ---------------------------------------------------------------------------------------


def test_a_managed_model_is_prefetched_served_and_streams_through_the_router(
    stack: Release, registry_model: RegistryModel
) -> None:
    before = blob_bytes()
    started = time.monotonic()
    client.CustomObjectsApi(stack.cluster.api).create_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, managed_model("gemma")
    )
    # A client asks for the model from the moment it exists (its early requests fail or wait in the
    # router), so that a request reaching the pod before its warm-up would be there to be caught.
    with contextlib.closing(chat_loop(stack).start()) as early_client:
        wait_ready(stack, "gemma")
        REPORT["apply to Ready (s)"] = round(time.monotonic() - started, 1)
        wait_for(lambda: early_client.answered >= 1, "the early client's first answer", timeout=START)
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

    # It became Ready only through the warm-up: the operator's generation came first, and the early
    # client's requests reached the pod only after it had ended.
    assert assert_warmed_up_before_any_routed_request(stack, pod) >= 1
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


# NetworkPolicies, with packets: kube-router enforces them on the real node (hack/node.sh) --------

# Run inside a pod: "open" when a TCP connection to host:port succeeds within 3 s, else why not.
# GET a URL from inside a pod (the router's image has Python, and the policies admit the router).
FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
# A refusal must hold this many times in a row once seen.
CONSECUTIVE_TRIES = 3
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("open")
except OSError as exc:
    print("closed", type(exc).__name__)
"""


def client_pod(namespace: str, name: str, image: str, labels: dict[str, str]) -> dict[str, Any]:
    """A pod on the real node that only waits, to open connections from (the router's image has Python)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nodeSelector": {"modelfleet.io/real-node": "true"},
            "tolerations": [{"key": "modelfleet.io/real-node", "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 0,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "client", "image": image, "imagePullPolicy": "Never",
                "command": ["python", "-c", "import time; time.sleep(3600)"],
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }  # fmt: skip


def test_network_policies_drop_what_they_do_not_admit(stack: Release) -> None:
    """The chart's and the operator's policies, enforced: from a pod of another namespace, nothing of
    the release answers; the ingress controller's pods reach the router; the router reaches Redis and
    the model's pod. Each refusal is paired with a pod that reaches the same address and port, so a
    closed port is the policy's doing, not a server that is not listening."""
    core = client.CoreV1Api(stack.cluster.api)
    namespace = stack.namespace
    (router, *_) = stack.pods("router")
    (redis,) = stack.pods("redis")
    (model,) = serving_pods(stack, "gemma")
    operator = next(pod for pod in stack.pods("operator") if pod.metadata.name.endswith("-0"))
    image = router.spec.containers[0].image
    services = {name: core.read_namespaced_service(name, namespace) for name in
                (f"{stack.fullname}-router", f"{stack.fullname}-redis", "im-gemma")}  # fmt: skip
    router_service, redis_service, model_service = services.values()
    targets = {
        "router Service": (router_service.spec.cluster_ip, router_service.spec.ports[0].port),
        "router pod": (router.status.pod_ip, router.spec.containers[0].ports[0].container_port),
        "Redis Service": (redis_service.spec.cluster_ip, redis_service.spec.ports[0].port),
        "Redis pod": (redis.status.pod_ip, redis.spec.containers[0].ports[0].container_port),
        "model Service": (model_service.spec.cluster_ip, model_service.spec.ports[0].port),
        "model pod": (model.status.pod_ip, model.spec.containers[0].ports[0].container_port),
        "operator metrics": (operator.status.pod_ip, 9090),
    }
    # Who may reach each target: the positive control of every refusal of it.
    admitted = {"router Service": "ingress controller", "router pod": "ingress controller",
                "Redis Service": "router", "Redis pod": "router", "model Service": "router", "model pod": "router",
                "operator metrics": "Prometheus"}  # fmt: skip

    # An outsider: a pod of another namespace, with no label any policy admits. And a pod where the
    # chart's default policy expects the ingress controller (namespace ingress-nginx, its pod label).
    outside = f"{namespace}-outside"
    # And a pod where the chart's policies expect Prometheus (namespace monitoring, its pod label).
    existing = {n.metadata.name for n in core.list_namespace().items}
    created_namespaces = [outside, *(name for name in ("ingress-nginx", "monitoring") if name not in existing)]
    for name in created_namespaces:
        core.create_namespace({"metadata": {"name": name, "labels": {"modelfleet.io/test": "networkpolicy"}}})
    clients = {
        "outsider": (outside, "outsider", {"app": "outsider"}),
        "ingress controller": ("ingress-nginx", f"{namespace}-ingress", {"app.kubernetes.io/name": "ingress-nginx"}),
        "Prometheus": ("monitoring", f"{namespace}-prometheus", {"app.kubernetes.io/name": "prometheus"}),
    }
    try:
        for pod_namespace, name, labels in clients.values():
            core.create_namespaced_pod(pod_namespace, client_pod(pod_namespace, name, image, labels))
        for pod_namespace, name, _ in clients.values():
            stack.cluster.kubectl("-n", pod_namespace, "wait", "--for=condition=Ready", f"pod/{name}", "--timeout=120s")

        def from_pod(pod_namespace: str, pod: str, target: str) -> str:
            host, port = targets[target] if target in targets else (target.split(":")[0], int(target.split(":")[1]))
            return stack.cluster.kubectl("-n", pod_namespace, "exec", pod, "--", "python", "-c", CONNECT, host,
                                         str(port)).stdout.strip()  # fmt: skip

        release_pods = {"router": router, "operator": operator}

        def reaches(source: str, target: str) -> bool:
            if source in release_pods:
                pod_namespace, pod = namespace, release_pods[source].metadata.name
            else:
                pod_namespace, pod = clients[source][:2]
            return from_pod(pod_namespace, pod, target) == "open"

        seen: dict[tuple[str, str], str] = {}

        def expect(source: str, target: str, wanted: bool) -> None:
            # kube-router applies a change within moments of the pod's or policy's event: poll, bounded.
            outcome = "open" if wanted else "refused"
            wait_for(lambda: reaches(source, target) is wanted, f"{source} -> {target} to be {outcome}",
                     timeout=60, interval=2)  # fmt: skip
            # Then it holds: one lucky dropped SYN is not a policy. Each further refusal is paired with the
            # admitted source reaching the same address and port at that moment.
            for attempt in range(CONSECUTIVE_TRIES - 1):
                assert reaches(source, target) is wanted, f"{source} -> {target} was not {outcome} on try {attempt + 2}"
                if not wanted and target in admitted:
                    assert reaches(admitted[target], target), f"{admitted[target]} -> {target} (control) failed"
            seen[(source, target)] = outcome

        # The outsider's network works: it reaches the API server's Service, which no policy guards.
        expect("outsider", "10.96.0.1:443", True)
        for target in targets:
            expect("outsider", target, False)
        # The same addresses answer the pods the policies admit.
        expect("ingress controller", "router Service", True)
        expect("ingress controller", "router pod", True)
        for target in ("Redis Service", "Redis pod", "model Service", "model pod"):
            expect("ingress controller", target, False)
            expect("router", target, True)
        # Prometheus scrapes the router and the operator's metrics; the operator warms the model's pods up.
        expect("Prometheus", "router pod", True)
        expect("Prometheus", "operator metrics", True)
        expect("Prometheus", "Redis pod", False)
        expect("operator", "model pod", True)
        expect("operator", "Redis pod", False)
        REPORT["NetworkPolicy checks (source -> target)"] = len(seen)
    finally:
        for pod_namespace, name, _ in clients.values():
            core.delete_namespaced_pod(name, pod_namespace, grace_period_seconds=0)
        for name in created_namespaces:
            core.delete_namespace(name)


def router_in_flight(stack: Release) -> float:
    """Requests the router pods are running for the model now, read from each pod's /metrics."""
    total = 0.0
    for pod in stack.pods("router"):
        port = pod.spec.containers[0].ports[0].container_port
        with urllib.request.urlopen(f"http://{pod.status.pod_ip}:{port}/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith('modelfleet_in_flight_requests{model="gemma"'):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def test_sse_streams_through_a_real_ingress(stack: Release) -> None:
    """The chart's Ingress, served by a real controller (Traefik, hack/ingress.sh): the official SDK
    streams through it, and each chunk arrives while the generation still runs, not buffered to the end."""
    stack.run("upgrade", stack.name, str(CHART), "--reuse-values", "--set", "ingress.enabled=true",
              "--set", "ingress.className=traefik", "--set", "ingress.host=modelfleet.local",
              "--wait", "--timeout", f"{ROLLOUT}s")  # fmt: skip
    sdk = openai.OpenAI(
        base_url=f"http://{BRIDGE_ADDRESS}:{NETWORK['ingress_port']}/v1",
        api_key=api_key(stack),
        default_headers={"Host": "modelfleet.local"},
        max_retries=0,
        timeout=120,
    )

    def routed() -> bool:
        return "gemma" in [model.id for model in sdk.models.list()]

    wait_for(routed, "the ingress controller to route modelfleet.local to the router", timeout=120, interval=1)
    # Only what Traefik logs from here on: its log is kept across runs.
    access_log_path = Path(__file__).resolve().parents[2] / ".cache" / "ingress" / "traefik.log"
    access_log_start = access_log_path.stat().st_size
    stream = sdk.chat.completions.create(
        # Long enough that the generation still runs while the test reads the routers' metrics at the first
        # chunk (48 tokens could end within that read on an idle machine).
        model="gemma", messages=[{"role": "user", "content": "Tell a story about a lighthouse."}], max_tokens=256,
        stream=True, extra_body={"use_cache": False},
    )  # fmt: skip
    contents: list[str] = []
    running_at_first_chunk = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            contents.append(chunk.choices[0].delta.content)
            if running_at_first_chunk is None:
                # The client holds a chunk while the router still runs the request: nothing waited
                # for the end of the stream (a buffering proxy would deliver it all at once, after).
                running_at_first_chunk = router_in_flight(stack)
    assert len(contents) > 1, contents
    assert running_at_first_chunk == 1, f"the router ran {running_at_first_chunk} requests at the first chunk"
    wait_for(lambda: router_in_flight(stack) == 0, "the request to end in the router", timeout=30)
    with access_log_path.open("rb") as access_log:
        access_log.seek(access_log_start)
        this_run = access_log.read().decode(errors="replace")
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in this_run, this_run[-2000:]
    REPORT["streamed through the Ingress (chunks)"] = len(contents)


@dataclass
class StreamRecord:
    started: datetime
    ended: datetime | None = None
    chunks: int = 0
    finish_reason: str | None = None
    error: str | None = None


def stream_one_after_another(url: str, key: str, client_id: int, stop: threading.Event,
                             records: list[StreamRecord]) -> None:  # fmt: skip
    """`openai` SDK streams, back to back, on the SDK's own keep-alive connections, until stopped."""
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    for turn in itertools.count():
        if stop.is_set():
            return
        record = StreamRecord(started=datetime.now(UTC))
        records.append(record)
        try:
            prompt = f"Client {client_id}, story {turn}: a lighthouse."
            # Long streams, back to back: one of the two clients is almost always mid-stream, so the
            # rollout's pod deletions fall inside streams (32 tokens left gaps a deletion could miss).
            stream = sdk.chat.completions.create(
                model="gemma", messages=[{"role": "user", "content": prompt}], max_tokens=160, stream=True,
                extra_body={"use_cache": False},
            )  # fmt: skip
            for chunk in stream:
                for choice in chunk.choices:
                    record.chunks += 1
                    record.finish_reason = choice.finish_reason or record.finish_reason
            if record.finish_reason is None:
                record.error = f"the stream ended without a finish_reason after {record.chunks} chunks"
        except Exception as exc:  # every failure counts, whatever its kind
            record.error = repr(exc)
        record.ended = datetime.now(UTC)
        stop.wait(0.1)


def test_helm_upgrade_rolls_the_routers_under_keep_alive_clients_and_streams(stack: Release) -> None:
    """Both router pods are replaced while real clients keep their connections open: the SDK streams back to
    back and a keep-alive client lists models. Every connection was opened to an old pod, so each client
    meets a drain; every stream completes and no request fails."""
    url, key = node_port_url(stack), api_key(stack)
    old_pods = {pod.metadata.name for pod in stack.pods("router")}
    deletions: dict[str, datetime] = {}
    stop = threading.Event()
    streams: list[StreamRecord] = []
    listed, list_failures = 0, []

    def watch_deletions() -> None:
        while not stop.wait(0.25):
            for pod in stack.pods("router"):
                meta = pod.metadata
                if meta.name in old_pods and meta.deletion_timestamp is not None:
                    # deletionTimestamp is when the grace period ends; the pod was told to stop that long before.
                    told = meta.deletion_timestamp - timedelta(seconds=meta.deletion_grace_period_seconds or 0)
                    deletions.setdefault(meta.name, told)

    streamers = [threading.Thread(target=stream_one_after_another, args=(url, key, i, stop, streams), daemon=True)
                 for i in range(2)]  # fmt: skip
    watcher = threading.Thread(target=watch_deletions, daemon=True)
    for thread in (*streamers, watcher):
        thread.start()
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as keep_alive:

            def list_models() -> None:
                nonlocal listed
                try:
                    response = keep_alive.get("/v1/models")
                    if response.status_code == 200:
                        listed += 1
                    else:
                        list_failures.append(f"{response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as exc:
                    list_failures.append(repr(exc))

            wait_for(lambda: (list_models(), len([r for r in streams if r.ended]) >= 2)[1],
                     "the first streams to complete", timeout=120, interval=1.5)  # fmt: skip
            upgrade = threading.Thread(target=stack.run, args=(
                "upgrade", stack.name, str(CHART), "--reuse-values", "--set", "router.defaultMaxTokens=200",
                "--wait", "--timeout", f"{ROLLOUT}s"), daemon=True)  # fmt: skip
            upgrade.start()
            while upgrade.is_alive() or not old_pods.isdisjoint(p.metadata.name for p in stack.pods("router")):
                list_models()
                # A finished thread's join returns at once: wait on the clock then, not in a tight loop.
                if upgrade.is_alive():
                    upgrade.join(timeout=1.5)
                else:
                    stop.wait(1.5)
            # And some after the rollout, from the new pods.
            for _ in range(5):
                list_models()
                stop.wait(1.5)
    finally:
        stop.set()
        for thread in (*streamers, watcher):
            thread.join(timeout=150)
    assert not any(thread.is_alive() for thread in streamers), "a stream was still running when the clients stopped"
    assert set(deletions) == old_pods, (deletions, old_pods)
    failed = [r for r in streams if r.error is not None or r.ended is None]
    assert failed == [], f"{len(failed)} of {len(streams)} streams failed: {failed[:5]}"
    assert list_failures == [], f"{len(list_failures)} of {listed + len(list_failures)} failed: {list_failures[:5]}"
    # The streams crossed the rollout: some were running when an old pod was told to stop (the deletion
    # time has one-second resolution).
    crossing = [r for r in streams for at in deletions.values()
                if r.ended is not None and r.started <= at and r.ended >= at + timedelta(seconds=1)]  # fmt: skip
    assert crossing, (streams, deletions)
    REPORT["helm upgrade: streams, of them crossing a router pod's deletion, keep-alive lists"] = (
        len(streams), len(crossing), listed)  # fmt: skip


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
    with chat_loop(stack) as loop:
        patch_spec(stack, "gemma", {"replicas": 2})
        wait_ready(stack, "gemma", replicas=2)
        (new,) = [p for p in serving_pods(stack, "gemma") if p.metadata.name not in existing]
        # Keep going until the router has sent the new pod some of the load.
        router_ips = {p.status.pod_ip for p in stack.pods("router")}
        wait_for(lambda: any(r.address in router_ips for r in model_requests(stack, new.metadata.name)),
                 "the router to send the new replica requests", timeout=120)  # fmt: skip
    assert loop.failures == [], loop.failures[:5]
    assert assert_warmed_up_before_any_routed_request(stack, new) >= 1
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


def admin_call(
    stack: Release, method: str, path: str, key: str = "admin-key", **query: str
) -> tuple[int, dict[str, str], Any]:
    """(status, headers with lower-case names, JSON body) of an admin API call through the router's NodePort."""
    url = f"{node_port_url(stack)}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    headers = {"Authorization": f"Bearer {api_key(stack, key)}"}
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=700) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read() or b"null")


def test_unload_and_load_through_the_admin_api_with_the_routers_own_account(stack: Release) -> None:
    """The router's ServiceAccount may patch inferencemodels/scale and nothing more; an unload takes the pod
    away and fails requests at once, a load brings it back from the cached weights and answers once Ready."""
    before = blob_bytes()
    (pod,) = serving_pods(stack, "gemma")

    status, _, unloaded = admin_call(stack, "POST", "/v1/admin/models/gemma/unload", wait="300")
    assert status == 200, unloaded
    assert (unloaded["state"], unloaded["replicas"], unloaded["previous_replicas"]) == ("unloaded", 0, 1), unloaded
    assert get_model(stack, "gemma")["spec"]["replicas"] == 0
    wait_for(lambda: serving_pods(stack, "gemma") == [], "the serving pod to go", timeout=ROLLOUT)
    wait_for(lambda: condition(get_model(stack, "gemma"), "Ready").get("reason") == "Unloaded",
             "the model to say it is unloaded", timeout=60)  # fmt: skip
    assert get_model(stack, "gemma")["status"]["loadReplicas"] == 1
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as refused:
        openai_client(stack).chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=4)  # fmt: skip
    assert (refused.value.status_code, refused.value.code) == (503, "model_unloaded"), refused.value
    REPORT["request to an unloaded model refused after (s)"] = round(time.monotonic() - started, 3)

    # A load that does not wait answers 202 and says where to poll; the poll sees the model come back.
    status, headers, loading = admin_call(stack, "POST", "/v1/admin/models/gemma/load", wait="0")
    assert status == 202, loading
    assert (loading["state"], loading["replicas"]) == ("loading", 1), loading
    assert headers.get("location") == "/v1/admin/models/gemma" == loading["poll"]
    started = time.monotonic()
    status, _, loaded = admin_call(stack, "POST", "/v1/admin/models/gemma/load", wait="600")
    assert status == 200, loaded
    assert (loaded["state"], loaded["model"]["replicas"]) == ("ready", 1), loaded
    REPORT["load to Ready through the admin API (s)"] = round(time.monotonic() - started, 1)
    status, _, polled = admin_call(stack, "GET", loading["poll"])
    assert (status, polled["state"], polled["managed"]["replicas"]) == (200, "ready", 1), polled
    (back,) = serving_pods(stack, "gemma")
    assert back.metadata.name != pod.metadata.name
    assert streamed_chat(stack, "The capital of France is").strip()
    assert downloaded_since(before) == {}, "a load downloaded the weights again"

    # The GPUs and memory of each model: this pod asks for no GPU; Ollama says what the model holds.
    status, _, report = admin_call(stack, "GET", "/v1/admin/gpu-memory")
    assert status == 200, report
    (gemma,) = [entry for entry in report["models"] if entry["model"] == "gemma"]
    assert (gemma["gpus"], gemma["pods"]) == (0, 1), gemma
    (loaded_here,) = gemma["loaded"]
    assert loaded_here["size_bytes"] > gemma["estimate"]["weights_bytes"] > 0, gemma
    REPORT["gpu-memory for gemma"] = {"estimate": gemma["estimate"], "loaded": loaded_here}

    # Only an admin key may load or unload.
    status, _, denied = admin_call(stack, "POST", "/v1/admin/models/gemma/unload", key="user-key")
    assert (status, denied["error"]["code"]) == (403, "admin_required"), denied
    assert get_model(stack, "gemma")["spec"]["replicas"] == 1


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
    with chat_loop(stack) as loop:
        patch_spec(stack, "gemma", {"model": VARIANT})
        wait_for(lambda: get_model(stack, "gemma")["status"].get("servedModel") == VARIANT,
                 "the router's name for the model to follow the new pods", timeout=START)  # fmt: skip
        answered_at_switch = loop.answered
        wait_for(lambda: loop.answered >= answered_at_switch + 3 or bool(loop.failures),
                 "answers from the new model", timeout=120)  # fmt: skip

        def only_the_new_model_serves() -> bool:
            served = [p.metadata.annotations.get("modelfleet.io/served-model") for p in serving_pods(stack, "gemma")]
            return bool(served) and set(served) == {VARIANT}

        wait_for(only_the_new_model_serves, "only pods of the new model to serve", timeout=ROLLOUT)
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
    # The answers after the switch came from the new model: the router's requests reached the new pod,
    # and what that pod's engine has loaded is the variant, not the model it replaced.
    for turn in range(2):
        assert streamed_chat(stack, f"After the change, chat {turn}: say hi.", max_tokens=8)
    router_ips = {p.status.pod_ip for p in stack.pods("router")}
    routed = [r for r in model_requests(stack, pod.metadata.name) if r.address in router_ips]
    assert len(routed) >= 2, routed
    (router, *_) = stack.pods("router")
    port = pod.spec.containers[0].ports[0].container_port
    loaded = json.loads(stack.cluster.kubectl("-n", stack.namespace, "exec", router.metadata.name, "--", "python", "-c",
                                              FETCH, f"http://{pod.status.pod_ip}:{port}/api/ps").stdout)  # fmt: skip
    names = [model["name"] for model in loaded["models"]]
    assert names, loaded
    assert all(VARIANT in name for name in names), names
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
