"""What every child of an InferenceModel shares: its input, names, labels and owner reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelfleet.api import v1alpha1
from modelfleet.api.naming import (
    COMPONENT_LABEL,
    INSTANCE_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MODEL_LABEL,
    MODEL_SERVER,
    NAME_LABEL,
    child_base_name,
)

Manifest = dict[str, Any]


@dataclass(frozen=True)
class RuntimeImages:
    """Default images per runtime, pinned; a model may override with spec.image."""

    ollama: str = "docker.io/ollama/ollama:0.17.4"
    vllm: str = "docker.io/vllm/vllm-openai:v0.32.0"
    # The official vLLM image is CUDA-only; a vLLM model that asks for no GPU runs vLLM's CPU build
    # (Dockerfile.vllm-cpu).
    vllm_cpu: str = "ghcr.io/modelfleet/vllm-cpu:0.32.0"


@dataclass(frozen=True)
class NetworkPeers:
    """Who may connect to a model's pods: the router's pods, and Prometheus for engines that export metrics.

    Label maps select namespaces and pods; an empty monitoring_namespace_labels admits no Prometheus.
    """

    router_namespace: str = "modelfleet-system"
    router_pod_labels: dict[str, str] = field(
        default_factory=lambda: {NAME_LABEL: "modelfleet", COMPONENT_LABEL: "router"}
    )
    # The operator sends each new pod a warm-up generation before the pod may count as Ready.
    operator_pod_labels: dict[str, str] = field(
        default_factory=lambda: {NAME_LABEL: "modelfleet", COMPONENT_LABEL: "operator"}
    )
    monitoring_namespace_labels: dict[str, str] = field(default_factory=dict)
    monitoring_pod_labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelContext:
    """Everything a builder may read: the InferenceModel's identity and typed spec, and operator defaults."""

    name: str
    namespace: str
    uid: str
    spec: v1alpha1.InferenceModelSpec
    images: RuntimeImages = field(default_factory=RuntimeImages)
    # None: the operator creates no NetworkPolicy (the cluster's own policies apply).
    network: NetworkPeers | None = None
    # Observed in the cluster, for the prefetch Job: the cache claim's UID (a new volume must be filled
    # again, even under the same name) and the node whose pods mount it now (a ReadWriteOnce volume can
    # only be mounted there).
    cache_claim_uid: str | None = None
    volume_node: str | None = None

    @property
    def resources(self) -> v1alpha1.Resources:
        return self.spec.resources or v1alpha1.Resources()

    @property
    def cache(self) -> v1alpha1.Cache:
        return self.spec.cache or v1alpha1.Cache()

    @property
    def serving(self) -> v1alpha1.Serving:
        return self.spec.serving or v1alpha1.Serving()

    @property
    def autoscaling(self) -> v1alpha1.Autoscaling:
        return self.spec.autoscaling or v1alpha1.Autoscaling()

    @property
    def unloaded(self) -> bool:
        """spec.replicas 0: no pods, whatever autoscaling says (what an unload through the scale subresource sets)."""
        return self.spec.replicas == 0

    @property
    def autoscaled(self) -> bool:
        """The HPA owns the replica count.  Not while unloaded: as a Deployment scaled to 0 by hand
        pauses its HPA in Kubernetes itself, spec.replicas 0 pauses the model's autoscaling."""
        return self.autoscaling.enabled and not self.unloaded

    @property
    def runtime(self) -> str:
        if self.spec.runtime is None:
            raise ValueError(f"{self.namespace}/{self.name} has no runtime: it is an endpoint model, with no pods")
        return self.spec.runtime

    @property
    def image(self) -> str:
        if self.spec.image:
            return self.spec.image
        if self.runtime == "ollama":
            return self.images.ollama
        return self.images.vllm if self.uses_gpu else self.images.vllm_cpu

    @property
    def uses_gpu(self) -> bool:
        return self.resources.gpu > 0

    @property
    def cache_claim_name(self) -> str:
        return self.cache.existing_claim or child_name(self, "cache")

    @property
    def served_model(self) -> str:
        """The name the serving pods answer to, which the router sends upstream.

        Ollama answers to the model's own name (spec.model, stored under that name by the prefetch Job).
        vLLM answers to the InferenceModel's name as well as spec.model: the name stays the same while
        spec.model changes, so old and new pods both accept it during a rollout.
        """
        return self.spec.model if self.runtime == "ollama" else self.name


def child_name(context: ModelContext, suffix: str = "") -> str:
    """Children are named after the model; suffixes tell the kinds that share a namespace apart."""
    base = child_base_name(context.name)
    return f"{base}-{suffix}" if suffix else base


def selector_labels(context: ModelContext) -> dict[str, str]:
    """Labels that select the model's serving pods; immutable once a Deployment exists."""
    return {MODEL_LABEL: context.name, COMPONENT_LABEL: MODEL_SERVER}


def labels(context: ModelContext, component: str) -> dict[str, str]:
    return {
        NAME_LABEL: "modelfleet-model",
        INSTANCE_LABEL: context.name,
        MANAGED_BY_LABEL: MANAGED_BY,
        COMPONENT_LABEL: component,
        MODEL_LABEL: context.name,
    }


def owner_reference(context: ModelContext) -> Manifest:
    return {
        "apiVersion": f"{v1alpha1.GROUP}/{v1alpha1.VERSION}",
        "kind": v1alpha1.KIND,
        "name": context.name,
        "uid": context.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(context: ModelContext, name: str, component: str) -> Manifest:
    return {
        "name": name,
        "namespace": context.namespace,
        "labels": labels(context, component),
        "ownerReferences": [owner_reference(context)],
    }


def pod_security_context() -> Manifest:
    """Non-root with a fixed UID, so the cache volume (fsGroup) is writable by every pod of the model."""
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Manifest:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
