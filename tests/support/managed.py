"""Managed models on the real node, as the e2e tests drive them: the registry's model, InferenceModels
in a chart release's namespace, their pods, and chat clients through the router."""

from __future__ import annotations

import itertools
import json
import re
import urllib.request
from dataclasses import dataclass
from typing import Any

import openai
from kubernetes import client

from tests.support.gin import EngineRequest, engine_requests
from tests.support.procs import wait_for
from tests.support.realnode import BRIDGE_ADDRESS, NETWORK, Release, RequestLoop, api_key, node_port_url, pod_report

REGISTRY = f"{BRIDGE_ADDRESS}:{NETWORK['registry_port']}"
REGISTRY_MODEL = NETWORK["registry_model"]  # library/gemma3:270m
MODEL = REGISTRY_MODEL.removeprefix("library/")  # what spec.model says: Ollama adds library/ itself
VARIANT = "gemma3-terse:270m"  # the same weights with other parameters: a second model to change to
BLOB_METRICS = f"http://127.0.0.1:{NETWORK['registry_blob_metrics_port']}/metrics"
GROUP, VERSION, PLURAL = "modelfleet.io", "v1alpha1", "inferencemodels"
WARMED_UP = "modelfleet.io/warmed-up"
# Starting a model on two shared cores: download, container start, load and warm-up. Bounds, not goals.
START = 600


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


def registry_manifest(reference: str) -> dict[str, Any]:
    name, tag = reference.rsplit(":", 1)
    request = urllib.request.Request(
        f"http://{REGISTRY}/v2/{name}/manifests/{tag}",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        manifest: dict[str, Any] = json.load(response)
    return manifest


# Models and clients ------------------------------------------------------------------------------


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
    found: Any = client.CustomObjectsApi(stack.cluster.api).get_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, name
    )
    return dict(found)


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
    pods: list[Any] = (
        client.CoreV1Api(stack.cluster.api).list_namespaced_pod(stack.namespace, label_selector=selector).items
    )
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


def model_requests(stack: Release, pod: str) -> list[EngineRequest]:
    """Every generation request in a serving pod's Ollama log, in the order they ended, each dated."""
    return engine_requests(stack.cluster.kubectl("-n", stack.namespace, "logs", "--timestamps", pod).stdout)


def assert_warmed_up_before_any_routed_request(stack: Release, pod: Any) -> int:
    """The pod's first generation is the operator's warm-up; every request from a router started after the
    warm-up ended, and the readiness gate turned True only then.  Returns how many routed requests there were.

    Ollama logs a request when it ends, so the order of its lines proves nothing: a routed request that
    arrived during a short warm-up would still be logged after it.  The start times do."""
    requests = model_requests(stack, pod.metadata.name)
    operator_ips = {p.status.pod_ip for p in stack.pods("operator")}
    router_ips = {p.status.pod_ip for p in stack.pods("router")}
    assert requests, f"{pod.metadata.name} served no generation"
    warm_up = min(requests, key=lambda request: request.started)
    assert (warm_up.address in operator_ips, warm_up.path, warm_up.status) == (True, "/api/generate", 200), (
        warm_up, operator_ips)  # fmt: skip
    routed = [request for request in requests if request.address in router_ips]
    early = [request for request in routed if request.started < warm_up.ended]
    assert not early, f"routed requests started before the warm-up ({warm_up}) ended: {early[:3]}"
    gate = next(c for c in pod.status.conditions if c.type == WARMED_UP)
    assert (gate.status, gate.reason) == ("True", "WarmedUp"), gate
    # The condition's time has one-second resolution.
    assert gate.last_transition_time >= warm_up.ended.replace(microsecond=0), (gate.last_transition_time, warm_up)
    return len(routed)


def chat_loop(stack: Release, model: str = "gemma") -> RequestLoop:
    """Short chats through the router with the `openai` SDK, one after another (use it as `with`).

    Each chat is a conversation of its own, as from many users: the router routes by prompt prefix, so
    one repeated prompt would go to one replica however many there are."""
    chat = openai_client(stack)
    visitors = itertools.count()

    def one_chat() -> str | None:
        content = f"Say hi to visitor {next(visitors)}."
        answer = chat.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=4
        )
        return None if answer.choices else f"no choices: {answer}"

    return RequestLoop(one_chat)
