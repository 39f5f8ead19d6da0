"""The ClusterIP Service in front of a managed model's pods."""

from __future__ import annotations

from modelfleet.api.naming import MODEL_SERVER, PORT_NAME
from modelfleet.operator.builders.common import Manifest, ModelContext, child_name, metadata, selector_labels
from modelfleet.operator.builders.workload import serving_port


def service_url(context: ModelContext) -> str:
    return f"http://{child_name(context)}.{context.namespace}.svc:{serving_port(context)}"


def build_service(context: ModelContext) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(context, child_name(context), MODEL_SERVER),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(context),
            "ports": [{"name": PORT_NAME, "port": serving_port(context), "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }
