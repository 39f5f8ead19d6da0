"""Operator settings, from the environment (prefix MODELFLEET_OPERATOR_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from modelfleet.operator.builders.common import NetworkPeers, RuntimeImages


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELFLEET_OPERATOR_")

    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch; empty means every namespace (cluster-wide)."
    )
    resync_seconds: float = Field(30.0, gt=0, description="Full reconcile of every model this often (drift, status).")
    endpoint_probe_timeout_seconds: float = Field(2.0, gt=0, description="Timeout of the reachability check.")
    ollama_image: str = Field(RuntimeImages.ollama, description="Default Ollama image.")
    vllm_image: str = Field(RuntimeImages.vllm, description="Default vLLM image (GPU models).")
    vllm_cpu_image: str = Field(RuntimeImages.vllm_cpu, description="Default vLLM image of models with no GPU.")
    liveness_host: str = Field("0.0.0.0", description="Address of Kopf's liveness endpoint.")
    liveness_port: int = Field(8080, description="Port of Kopf's liveness endpoint (/healthz).")
    metrics_port: int = Field(9090, description="Port of the Prometheus metrics endpoint; 0 turns it off.")
    metrics_host: str = Field("0.0.0.0", description="Address of the metrics endpoint.")
    peering_name: str = Field("modelfleet", description="Kopf peering object shared by the operator's replicas.")
    standalone: bool = Field(False, description="Run without peering (one replica, or local development).")
    priority: int | None = Field(
        None, description="Kopf peering priority of this replica (default: from the pod's StatefulSet ordinal)."
    )
    pod_name: str = Field("", description="This pod's name (downward API); its ordinal sets the default priority.")
    # The defaults match the Helm chart's defaults (release modelfleet in modelfleet-system); the chart
    # passes its actual router namespace and labels.
    network_policy: bool = Field(
        True, description="Give each managed model a NetworkPolicy that admits only the router (and Prometheus)."
    )
    router_namespace: str = Field("modelfleet-system", min_length=1, description="Namespace of the router pods.")
    router_pod_labels: dict[str, str] = Field(
        default_factory=lambda: dict(NetworkPeers().router_pod_labels),
        description="Labels of the router pods, the only pods admitted to model pods (JSON object).",
    )
    operator_pod_labels: dict[str, str] = Field(
        default_factory=lambda: dict(NetworkPeers().operator_pod_labels),
        description="Labels of the operator's pods (router's namespace), admitted to send warm-ups (JSON object).",
    )
    warmup_timeout_seconds: float = Field(
        900.0, gt=0, description="How long a warm-up generation may take: loading large weights takes minutes."
    )
    warmup_workers: int = Field(4, ge=1, le=64, description="Warm-ups that may run at the same time.")
    reconcile_workers: int = Field(
        8,
        ge=1,
        le=128,
        description="Reconciles that may run at the same time (each waits on the API server most of its time).",
    )
    monitoring_namespace_labels: dict[str, str] = Field(
        default_factory=lambda: {"kubernetes.io/metadata.name": "monitoring"},
        description="Labels of Prometheus's namespace, admitted to vLLM's /metrics; {} admits no Prometheus.",
    )
    monitoring_pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/name": "prometheus"},
        description="Labels of the Prometheus pods in that namespace; {} means every pod there.",
    )

    def peering_priority(self) -> int:
        """Replicas must differ: Kopf freezes every peer when two share the highest priority.

        In the chart's StatefulSet, pod -0 gets 100, -1 gets 99, ...: the lowest ordinal works and
        the others stand by in a predictable order.
        """
        if self.priority is not None:
            return self.priority
        ordinal = self.pod_name.rsplit("-", 1)[-1]
        return 100 - int(ordinal) if ordinal.isdigit() else 0

    @property
    def images(self) -> RuntimeImages:
        return RuntimeImages(ollama=self.ollama_image, vllm=self.vllm_image, vllm_cpu=self.vllm_cpu_image)

    @property
    def network_peers(self) -> NetworkPeers | None:
        if not self.network_policy:
            return None
        return NetworkPeers(
            router_namespace=self.router_namespace,
            router_pod_labels=dict(self.router_pod_labels),
            operator_pod_labels=dict(self.operator_pod_labels),
            monitoring_namespace_labels=dict(self.monitoring_namespace_labels),
            monitoring_pod_labels=dict(self.monitoring_pod_labels),
        )
