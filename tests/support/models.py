"""InferenceModel inputs shared by the builder tests: every runtime and option combination."""

from __future__ import annotations

import itertools
from typing import Any

from modelfleet.api import v1alpha1
from modelfleet.operator.builders import autoscaling, cache, service, workload
from modelfleet.operator.builders.common import ModelContext

RUNTIMES = ["ollama", "vllm"]
GPUS = [0, 1, 2]
SCALING = ["fixed-1", "fixed-3", "router", "engine"]
CACHES = ["rwo", "rwx", "existing"]


# The owner reference every child of make_context's model carries.
OWNER = {
    "apiVersion": "modelfleet.io/v1alpha1",
    "kind": "InferenceModel",
    "name": "demo",
    "uid": "1234-uid",
    "controller": True,
    "blockOwnerDeletion": True,
}


def make_context(runtime: str, gpu: int, scaling: str, cache_kind: str) -> ModelContext:
    spec: dict[str, Any] = {
        "runtime": runtime,
        "model": "phi3:mini" if runtime == "ollama" else "Qwen/Qwen2.5-7B-Instruct-AWQ",
        "resources": {"gpu": gpu, "cpu": 4, "memory": "24Gi"},
        "serving": {"maxInFlightPerReplica": 6},
        "engine": {"args": ["--quantization", "awq"], "env": [{"name": "EXTRA", "value": "1"}]},
    }
    if scaling.startswith("fixed"):
        spec["replicas"] = int(scaling.split("-")[1])
    else:
        spec["autoscaling"] = {"enabled": True, "minReplicas": 0, "maxReplicas": 5, "metric": scaling}
    spec["cache"] = {
        "rwo": {"size": "30Gi"},
        "rwx": {"size": "30Gi", "accessMode": "ReadWriteMany", "storageClassName": "nfs"},
        "existing": {"existingClaim": "shared-weights"},
    }[cache_kind]
    return ModelContext(
        name="demo", namespace="models", uid="1234-uid", spec=v1alpha1.InferenceModelSpec.model_validate(spec)
    )


COMBINATIONS = [
    combo
    for combo in itertools.product(RUNTIMES, GPUS, SCALING, CACHES)
    if not (combo[2] == "engine" and combo[0] != "vllm")  # the CRD refuses engine metrics for ollama
]


def all_children(context: ModelContext) -> list[dict[str, Any]]:
    built = [
        workload.build_deployment(context),
        service.build_service(context),
        cache.build_cache_claim(context),
        cache.build_prefetch_job(context),
        autoscaling.build_hpa(context),
        autoscaling.build_pdb(context),
    ]
    return [child for child in built if child is not None]
