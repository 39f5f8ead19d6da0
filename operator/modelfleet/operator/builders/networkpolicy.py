"""The NetworkPolicy that lets only the router (and Prometheus, for vLLM's metrics) reach a model's pods.

It selects every pod the operator runs for the model (serving and prefetch) and admits, on the
serving port only, the router's pods in the router's namespace and the operator's pods (which send each
new pod a warm-up generation). vLLM serves /metrics on its API
port, so Prometheus is admitted to vLLM pods when a monitoring namespace is configured; Ollama has no
metrics endpoint. Egress stays open: prefetch Jobs download weights, and the addresses a model may
need cannot be named portably. Kubelet probes are not subject to NetworkPolicy.
"""

from __future__ import annotations

from modelfleet.api.naming import MANAGED_BY, MANAGED_BY_LABEL, MODEL_LABEL, MODEL_SERVER
from modelfleet.operator.builders.common import (
    Manifest,
    ModelContext,
    NetworkPeers,
    child_name,
    metadata,
)
from modelfleet.operator.builders.workload import serving_port

# Set by the API server on every namespace (Kubernetes 1.22+), so a namespace can be selected by name.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def model_pod_labels(context: ModelContext) -> dict[str, str]:
    """Every pod the operator runs for this model: the serving Deployment's and the prefetch Job's."""
    return {MODEL_LABEL: context.name, MANAGED_BY_LABEL: MANAGED_BY}


def allowed_sources(context: ModelContext, peers: NetworkPeers) -> list[Manifest]:
    sources: list[Manifest] = [
        {
            "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: peers.router_namespace}},
            "podSelector": {"matchLabels": dict(labels)},
        }
        # The router sends requests; the operator sends each new pod its warm-up generation.
        for labels in (peers.router_pod_labels, peers.operator_pod_labels)
    ]
    if context.runtime == "vllm" and peers.monitoring_namespace_labels:
        sources.append(
            {
                "namespaceSelector": {"matchLabels": dict(peers.monitoring_namespace_labels)},
                "podSelector": {"matchLabels": dict(peers.monitoring_pod_labels)},
            }
        )
    return sources


def build_network_policy(context: ModelContext) -> Manifest | None:
    """The policy, or None when the operator is configured to create none."""
    peers = context.network
    if peers is None:
        return None
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(context, child_name(context), MODEL_SERVER),
        "spec": {
            "podSelector": {"matchLabels": model_pod_labels(context)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": allowed_sources(context, peers),
                    "ports": [{"protocol": "TCP", "port": serving_port(context)}],
                }
            ],
        },
    }
