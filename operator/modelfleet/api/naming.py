"""The names the operator and the router agree on: what the operator calls a model's children, how it
labels and annotates them, and where the InferenceModel lives in the API.

The operator writes these names; the router finds models by them. Both import this module (as every
Kubernetes client imports k8s.io/api), so the contract is written once.
"""

from __future__ import annotations

from modelfleet.api.v1alpha1 import GROUP, PLURAL, VERSION

# A managed model's Service (and the base of every other child's name) is im-<model>; the model's name
# is at most v1alpha1.MAX_NAME_LENGTH characters so that this stays a DNS label.
CHILD_PREFIX = "im-"
# The named port of a managed model's Service and pods, which the router reads in its EndpointSlices.
PORT_NAME = "http"

# Labels.
MODEL_LABEL = "modelfleet.io/model"  # which InferenceModel a child belongs to
COMPONENT_LABEL = "app.kubernetes.io/component"
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "modelfleet-operator"  # the value of MANAGED_BY_LABEL on every child the operator writes
MODEL_SERVER = "model-server"  # the value of COMPONENT_LABEL on a managed model's serving children
MODEL_PREFETCH = "model-prefetch"  # the value of COMPONENT_LABEL on its prefetch Jobs
# The label Kubernetes puts on a Service's EndpointSlices.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

# Annotations.
SERVED_MODEL_ANNOTATION = "modelfleet.io/served-model"  # on a serving pod: the model its engine answers to
PREFETCH_MODEL_ANNOTATION = "modelfleet.io/prefetch-model"  # on a prefetch Job: the model it downloads
FINALIZER = "modelfleet.io/finalizer"
# The readiness gate of a serving pod: True once the operator's warm-up generation answered.
WARMED_UP_CONDITION = "modelfleet.io/warmed-up"

# Where InferenceModels live in the API.
API_VERSION = f"{GROUP}/{VERSION}"
COLLECTION_PATH = f"/apis/{GROUP}/{VERSION}/{PLURAL}"


def child_base_name(model: str) -> str:
    """im-<model>: the Service's name, and the start of every other child's."""
    return f"{CHILD_PREFIX}{model}"


def is_child_name(name: str) -> bool:
    return name.startswith(CHILD_PREFIX)


def collection_path(namespace: str | None = None) -> str:
    """The InferenceModels of one namespace, or of every namespace."""
    if namespace is None:
        return COLLECTION_PATH
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"


def scale_path(namespace: str, name: str) -> str:
    """One InferenceModel's scale subresource."""
    return f"{collection_path(namespace)}/{name}/scale"
