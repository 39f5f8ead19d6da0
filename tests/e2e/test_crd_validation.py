"""The API server itself refuses invalid InferenceModels, with a message that says what to fix."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from modelfleet.api import v1alpha1
from tests.e2e.conftest import Cluster

pytestmark = pytest.mark.e2e

# (case, spec, a fragment the API server's message must contain). This table is the record of
# the inputs tried; each must be refused.
INVALID_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("negative replicas", {"runtime": "ollama", "model": "phi3:mini", "replicas": -1},
     "should be greater than or equal to 0"),
    ("minReplicas above maxReplicas",
     {"runtime": "vllm", "model": "m", "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
     "spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas"),
    ("unknown runtime", {"runtime": "tgi", "model": "m"}, 'supported values: "ollama", "vllm"'),
    ("endpoint together with a GPU",
     {"model": "m", "endpoint": {"url": "http://127.0.0.1:11434"}, "resources": {"gpu": 1}},
     "spec.endpoint is an unmanaged backend"),
    ("bad cache quantity", {"runtime": "ollama", "model": "m", "cache": {"size": "20 gigs"}},
     "must be a Kubernetes quantity"),
    ("negative cpu", {"runtime": "ollama", "model": "m", "resources": {"cpu": -3}},
     "must be a non-negative Kubernetes quantity"),
    ("negative memory string", {"runtime": "ollama", "model": "m", "resources": {"memory": "-1Gi"}},
     "must be a non-negative Kubernetes quantity"),
    ("empty cache", {"runtime": "ollama", "model": "m", "cache": {"size": "0"}}, "greater than zero"),
    ("no runtime and no endpoint", {"model": "m"}, "spec.runtime is required"),
    ("missing model", {"runtime": "ollama"}, "spec.model: Required value"),
    ("empty model", {"runtime": "ollama", "model": ""}, "spec.model"),
    ("endpoint with a non-http URL", {"model": "m", "endpoint": {"url": "ftp://x"}},
     "must be an http:// or https:// URL"),
    ("engine metric on ollama",
     {"runtime": "ollama", "model": "m", "autoscaling": {"enabled": True, "metric": "engine"}},
     "needs runtime vllm"),
    ("unknown access mode", {"runtime": "ollama", "model": "m", "cache": {"accessMode": "ReadWriteSometimes"}},
     "supported values"),
    ("too many GPUs per replica", {"runtime": "vllm", "model": "m", "resources": {"gpu": 1000}},
     "should be less than or equal to 64"),
    ("registry with a scheme", {"runtime": "ollama", "model": "m", "source": {"registry": "http://reg:5000"}},
     "without a scheme (http://) or a path"),
    ("registry with a path", {"runtime": "ollama", "model": "m", "source": {"registry": "reg:5000/library"}},
     "without a scheme (http://) or a path"),
    ("registry port out of range", {"runtime": "ollama", "model": "m", "source": {"registry": "reg:70000"}},
     "the registry's port must be a number from 1 to 65535"),
    ("insecure together with a CA",
     {"runtime": "ollama", "model": "m",
      "source": {"registry": "reg:5000", "insecure": True, "caConfigMapRef": {"name": "ca", "key": "ca.crt"}}},
     "insecure (plain HTTP) and caConfigMapRef (HTTPS with a private CA) exclude each other"),
    ("registry source for vllm", {"runtime": "vllm", "model": "m", "source": {"registry": "reg:5000"}},
     "spec.source.registry is an OCI registry of Ollama models and needs runtime ollama"),
    ("hub source for ollama", {"runtime": "ollama", "model": "m", "source": {"huggingFaceEndpoint": "http://hub:8090"}},
     "spec.source.huggingFaceEndpoint is a Hugging Face hub and needs runtime vllm"),
    ("registry and hub", {"runtime": "vllm", "model": "m",
                          "source": {"registry": "reg:5000", "huggingFaceEndpoint": "http://hub:8090"}},
     "set one of registry (an OCI registry for Ollama) or huggingFaceEndpoint"),
    ("empty source", {"runtime": "vllm", "model": "m", "source": {}},
     "set one of registry (an OCI registry for Ollama) or huggingFaceEndpoint"),
    ("hub without a scheme", {"runtime": "vllm", "model": "m", "source": {"huggingFaceEndpoint": "hub:8090"}},
     "must be an http:// or https:// URL such as http://hf-mirror.models.svc:8090"),
    ("insecure hub", {"runtime": "vllm", "model": "m",
                      "source": {"huggingFaceEndpoint": "http://hub:8090", "insecure": True}},
     "insecure applies to a registry"),
    ("registry source with an endpoint",
     {"model": "m", "endpoint": {"url": "http://127.0.0.1:11434"}, "source": {"registry": "reg:5000"}},
     "remove runtime, image, resources (GPUs), scheduling, cache, engine, autoscaling, source and adapters"),
    ("adapters with an endpoint",
     {"model": "m", "endpoint": {"url": "http://127.0.0.1:11434"}, "adapters": [{"name": "a", "model": "org/a"}]},
     "remove runtime, image, resources (GPUs), scheduling, cache, engine, autoscaling, source and adapters"),
]  # fmt: skip

VALID_SPECS: list[tuple[str, dict[str, Any]]] = [
    ("minimal ollama", {"runtime": "ollama", "model": "phi3:mini"}),
    ("vllm with engine args", {"runtime": "vllm", "model": "Qwen/Qwen2.5-7B-Instruct-AWQ",
                               "resources": {"gpu": 1, "cpu": 4, "memory": "24Gi"},
                               "engine": {"args": ["--quantization", "awq", "--max-model-len", "8192"]}}),
    ("external endpoint", {"model": "gemma3:270m", "endpoint": {"url": "http://127.0.0.1:11434"}}),
    ("autoscaled", {"runtime": "ollama", "model": "m", "autoscaling": {"enabled": True, "minReplicas": 0,
                                                                       "maxReplicas": 8}}),
    ("private plain-HTTP registry", {"runtime": "ollama", "model": "gemma3:270m",
                                     "source": {"registry": "10.244.0.1:5000", "insecure": True}}),
    ("vLLM from a hub mirror", {"runtime": "vllm", "model": "org/model",
                                "source": {"huggingFaceEndpoint": "https://hub.models.svc:8443",
                                           "caConfigMapRef": {"name": "hub-ca", "key": "ca.crt"}}}),
    ("private registry with its CA", {"runtime": "ollama", "model": "gemma3:270m",
                                      "source": {"registry": "registry.models.svc",
                                                 "caConfigMapRef": {"name": "registry-ca", "key": "ca.crt"}}}),
]  # fmt: skip


def manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{v1alpha1.GROUP}/{v1alpha1.VERSION}",
        "kind": v1alpha1.KIND,
        "metadata": {"name": name},
        "spec": spec,
    }


@pytest.mark.parametrize(("case", "spec", "expected"), INVALID_SPECS, ids=[case for case, _, _ in INVALID_SPECS])
def test_invalid_spec_is_refused_with_a_clear_message(
    cluster: Cluster, inferencemodel_crd: str, namespace: str, case: str, spec: dict[str, Any], expected: str
) -> None:
    api = client.CustomObjectsApi(cluster.api)
    with pytest.raises(ApiException) as refused:
        api.create_namespaced_custom_object(
            v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, manifest("bad", spec)
        )
    assert refused.value.status == 422, case
    message = json.loads(refused.value.body)["message"]
    assert expected in message, f"{case}: {message}"


@pytest.mark.parametrize(("case", "spec"), VALID_SPECS, ids=[case for case, _ in VALID_SPECS])
def test_valid_spec_is_accepted_and_defaulted(
    cluster: Cluster, inferencemodel_crd: str, namespace: str, case: str, spec: dict[str, Any]
) -> None:
    api = client.CustomObjectsApi(cluster.api)
    created = api.create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, manifest("good", spec)
    )
    assert created["spec"]["replicas"] == 1, "the API server applies schema defaults"
    if "autoscaling" in spec:
        assert created["spec"]["autoscaling"]["targetQueueDepthPerReplica"] == 4
    # What the API server stored also parses with the typed model the operator uses.
    v1alpha1.InferenceModelSpec.model_validate(created["spec"])


def test_printer_columns_and_short_name(cluster: Cluster, inferencemodel_crd: str, namespace: str) -> None:
    api = client.CustomObjectsApi(cluster.api)
    api.create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, v1alpha1.PLURAL, manifest("shown", VALID_SPECS[0][1])
    )
    table = cluster.kubectl("get", "im", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "RUNTIME", "MODEL", "READY", "REPLICAS", "ENDPOINT", "AGE"]
    assert table[1].split()[:3] == ["shown", "ollama", "phi3:mini"]
    explained = cluster.kubectl("explain", "inferencemodels.spec.autoscaling.metric").stdout
    assert "modelfleet_queue_depth" in explained
