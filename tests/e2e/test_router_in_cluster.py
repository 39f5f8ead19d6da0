"""The router process pointed at the local cluster, as its own ServiceAccount: InferenceModels appear and
disappear without a restart, an endpoint model is served by the real Ollama, and a managed model with no
ready replica makes requests wait (with heartbeats) instead of failing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from kubernetes import client

from tests.conftest import OllamaServer, RouterServer, hashed_key, running_router, write_keys_file
from tests.e2e.conftest import Cluster, wait_for

pytestmark = pytest.mark.e2e

GROUP, VERSION, PLURAL = "modelfleet.io", "v1alpha1", "inferencemodels"


def create_model(cluster: Cluster, namespace: str, name: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceModel", "metadata": {"name": name}, "spec": spec}
    client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def delete_model(cluster: Cluster, namespace: str, name: str) -> None:
    client.CustomObjectsApi(cluster.api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def served(router: RouterServer) -> list[str]:
    return [model["id"] for model in httpx.get(f"{router.openai_base_url}/models", timeout=5).json()["data"]]


@pytest.fixture
def cluster_router(
    namespace: str, router_kubeconfig: Path, ollama_server: OllamaServer, tmp_path: Path
) -> Iterator[RouterServer]:
    """A router with no static models that learns them from this test's namespace only."""
    with running_router(tmp_path, [], kubernetes_discovery="true", kubeconfig=str(router_kubeconfig),
                        kubernetes_namespace=namespace, heartbeat_seconds="0.25") as router:  # fmt: skip
        yield router


def test_an_endpoint_model_is_served_within_seconds_of_the_apply(
    cluster: Cluster, namespace: str, cluster_router: RouterServer, ollama_server: OllamaServer
) -> None:
    assert served(cluster_router) == []
    applied = time.monotonic()
    create_model(cluster, namespace, "gemma-local", {
        "model": ollama_server.model,
        "endpoint": {"url": ollama_server.base_url, "api": "ollama"},
        "serving": {"aliases": ["g"], "maxInFlightPerReplica": 2},
    })  # fmt: skip
    wait_for(lambda: "gemma-local" in served(cluster_router), "the router to serve gemma-local", timeout=30)
    listed_after = time.monotonic() - applied

    sdk = openai.OpenAI(base_url=cluster_router.openai_base_url, api_key="unused", max_retries=0, timeout=120)
    answer = sdk.chat.completions.create(model="g", messages=[{"role": "user", "content": "Hello!"}], max_tokens=12)
    assert answer.model == "gemma-local"
    assert answer.choices[0].message.content
    assert answer.usage is not None
    assert answer.usage.completion_tokens > 0
    print(f"gemma-local listed {listed_after:.2f}s after the apply")

    delete_model(cluster, namespace, "gemma-local")
    wait_for(lambda: "gemma-local" not in served(cluster_router), "gemma-local to disappear", timeout=30)
    gone = httpx.post(f"{cluster_router.openai_base_url}/chat/completions",
                      json={"model": "g", "messages": [{"role": "user", "content": "Hi"}]}, timeout=10)  # fmt: skip
    assert gone.status_code == 404


def test_a_managed_model_without_ready_replicas_makes_requests_wait(
    cluster: Cluster, namespace: str, cluster_router: RouterServer
) -> None:
    """No operator runs here, so the model has no Service and no pods: zero ready replicas."""
    create_model(cluster, namespace, "big", {
        "runtime": "vllm", "model": "org/big-model", "resources": {"gpu": 8},
        "serving": {"requestTimeoutSeconds": 2},
    })  # fmt: skip
    wait_for(lambda: "big" in served(cluster_router), "the router to list big", timeout=30)
    body = {"model": "big", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    started = time.monotonic()
    response = httpx.post(f"{cluster_router.openai_base_url}/chat/completions", json=body, timeout=30)
    waited = time.monotonic() - started
    assert response.status_code == 200
    lines = [line for line in response.text.split("\n") if line]
    assert lines.count(": ping") >= 3, "heartbeats while waiting for a replica"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "queue_timeout"
    assert lines[-1] == "data: [DONE]"
    assert waited >= 2, "it waited for its deadline rather than failing at once"


ADMIN_KEY = "mf-admin-in-cluster"


@pytest.fixture
def admin_router(
    namespace: str, router_kubeconfig: Path, ollama_server: OllamaServer, tmp_path: Path
) -> Iterator[RouterServer]:
    """As cluster_router, with an admin key for the admin API."""
    keys = write_keys_file(tmp_path, hashed_key("ops", ADMIN_KEY, admin=True))
    with running_router(tmp_path, [], kubernetes_discovery="true", kubeconfig=str(router_kubeconfig),
                        kubernetes_namespace=namespace, api_keys_file=str(keys)) as router:  # fmt: skip
        yield router


def admin(router: RouterServer, action: str, name: str, **query: str) -> httpx.Response:
    return httpx.post(f"{router.base_url}/v1/admin/models/{name}/{action}", params=query,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)  # fmt: skip


def test_unload_and_load_patch_only_the_scale_subresource_as_the_routers_own_account(
    cluster: Cluster, namespace: str, admin_router: RouterServer, ollama_server: OllamaServer
) -> None:
    """No operator runs here: what is proved is the router's side.  Its own token patches spec.replicas
    through the scale subresource, an unloaded model's requests fail at once (where a model merely
    without replicas waits), a load that is not done yet answers 202 with where to poll, and models
    that are not the operator's answer 409."""
    custom = client.CustomObjectsApi(cluster.api)
    create_model(cluster, namespace, "small", {"runtime": "ollama", "model": "m:1b", "replicas": 2,
                                               "resources": {"gpu": 0}})  # fmt: skip
    outside = {"url": ollama_server.base_url, "api": "ollama"}
    create_model(cluster, namespace, "outside", {"model": ollama_server.model, "endpoint": outside})
    wait_for(lambda: {"small", "outside"} <= set(served(admin_router)), "the router to list both", timeout=30)

    unloaded = admin(admin_router, "unload", "small", wait="30")
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json()["state"] == "unloaded"
    assert (unloaded.json()["replicas"], unloaded.json()["previous_replicas"]) == (0, 2)
    assert custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "small")["spec"]["replicas"] == 0
    chat = {"model": "small", "messages": [{"role": "user", "content": "Hi"}]}
    refused = httpx.post(f"{admin_router.openai_base_url}/chat/completions", json=chat, timeout=30)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "model_unloaded"
    assert "/v1/admin/models/small/load" in refused.json()["error"]["message"]

    # Nothing brings a pod here, so the load is still in progress when it answers.
    loading = admin(admin_router, "load", "small", wait="0")
    assert loading.status_code == 202, loading.text
    assert loading.headers["location"] == "/v1/admin/models/small" == loading.json()["poll"]
    assert loading.json()["state"] == "loading"
    # With no operator, no status.loadReplicas: a load brings one replica.
    assert custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "small")["spec"]["replicas"] == 1

    def polled_state() -> str:
        polled = httpx.get(f"{admin_router.base_url}/v1/admin/models/small",
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)  # fmt: skip
        assert polled.status_code == 200, polled.text
        return str(polled.json()["state"])

    # The poll follows the watch: unloaded until the router sees spec.replicas 1, then waiting for a replica.
    wait_for(lambda: polled_state() == "no_ready_replicas", "the poll to see the load", timeout=30)

    not_managed = admin(admin_router, "unload", "outside")
    assert not_managed.status_code == 409, not_managed.text
    assert not_managed.json()["error"]["code"] == "model_not_managed"
    assert "existing endpoint" in not_managed.json()["error"]["message"]
    assert admin(admin_router, "load", "nothing-here").status_code == 404
