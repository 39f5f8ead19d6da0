"""The queue-depth HorizontalPodAutoscaler and the PodDisruptionBudget of a managed model."""

from __future__ import annotations

from modelfleet.api.naming import MODEL_SERVER
from modelfleet.operator.builders.common import Manifest, ModelContext, child_name, metadata, selector_labels
from modelfleet.operator.builders.workload import max_replicas

# The router exports modelfleet_queue_depth{model,namespace}; prometheus-adapter serves it as this
# External metric (see the chart's adapter rules).
ROUTER_QUEUE_METRIC = "modelfleet_queue_depth"
# vLLM's vllm:num_requests_waiting, renamed by prometheus-adapter (colons are not allowed in metric names).
ENGINE_QUEUE_METRIC = "vllm_num_requests_waiting"


def queue_metric(context: ModelContext) -> Manifest:
    target = {"type": "AverageValue", "averageValue": str(context.autoscaling.target_queue_depth_per_replica)}
    if context.autoscaling.metric == "engine":
        return {"type": "Pods", "pods": {"metric": {"name": ENGINE_QUEUE_METRIC}, "target": target}}
    selector = {"matchLabels": {"model": context.name, "namespace": context.namespace}}
    return {
        "type": "External",
        "external": {"metric": {"name": ROUTER_QUEUE_METRIC, "selector": selector}, "target": target},
    }


def lowest_replicas(context: ModelContext, scale_to_zero: bool) -> int:
    """The HPA's minReplicas: 0 only where the HPA can scale to zero.

    That needs an External (or Object) metric, which still has a value when no pod exists, and an
    API server that accepts minReplicas 0 (the HPAScaleToZero feature: on by default from Kubernetes
    1.37, alpha and off before). The router's queue depth is such a metric: requests wait in the
    router while there is no replica, and their count brings the first one up.
    """
    autoscaling = context.autoscaling
    if scale_to_zero and autoscaling.metric == "router":
        return autoscaling.min_replicas
    return max(1, autoscaling.min_replicas)


def build_hpa(context: ModelContext, scale_to_zero: bool = True) -> Manifest | None:
    """The model's HPA; scale_to_zero=False floors minReplicas at 1 (for API servers that refuse 0).

    None while the model is unloaded (spec.replicas 0): an HPA would bring pods back.
    """
    autoscaling = context.autoscaling
    if not context.autoscaled:
        return None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(context, child_name(context), "autoscaler"),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": child_name(context)},
            "minReplicas": lowest_replicas(context, scale_to_zero),
            "maxReplicas": autoscaling.max_replicas,
            "metrics": [queue_metric(context)],
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": autoscaling.scale_down_stabilization_seconds,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                },
            },
        },
    }


def build_pdb(context: ModelContext) -> Manifest | None:
    """Voluntary disruptions (drains) take one replica at a time, when there is more than one."""
    if max_replicas(context) <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(context, child_name(context), MODEL_SERVER),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(context)}},
    }
