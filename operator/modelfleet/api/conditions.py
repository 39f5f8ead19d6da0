"""The conditions of an InferenceModel's status: their types and reasons, each said once.

The operator writes them (operator/status.py); users, `kubectl wait --for=condition=Ready`, alerts
and the router read them. A reason is a CamelCase word, as in metav1.Condition; the message beside
it says what is happening and what to do.
"""

from __future__ import annotations

from enum import StrEnum


class ConditionType(StrEnum):
    READY = "Ready"  # at least the wanted replicas answer, or the endpoint does
    SCHEDULED = "Scheduled"  # the pods are placed on nodes
    MODEL_CACHED = "ModelCached"  # the weights are in the model's volume
    PROGRESSING = "Progressing"  # a rollout or a download is under way
    DEGRADED = "Degraded"  # something failed that a person should look at
    SCALE_TO_ZERO = "ScaleToZero"  # whether the cluster lets the HPA scale the model to zero


class Reason(StrEnum):
    # The spec and its volume.
    INVALID_SPEC = "InvalidSpec"  # the spec cannot be built into children; the message says what to fix
    CLAIM_NOT_FOUND = "ClaimNotFound"  # spec.cache.existingClaim names no claim
    # An unmanaged endpoint.
    ENDPOINT_REACHABLE = "EndpointReachable"
    ENDPOINT_UNREACHABLE = "EndpointUnreachable"
    # The weights.
    PREFETCHED = "Prefetched"  # the prefetch Job completed (or nothing needed downloading)
    PREFETCH_FAILED = "PrefetchFailed"
    DOWNLOADING = "Downloading"
    PENDING = "Pending"  # waiting for the prefetch Job to exist
    # Placement.
    UNSCHEDULABLE = "Unschedulable"  # the message names what no node has (GPUs, memory, a taint)
    SCHEDULED = "Scheduled"
    WAITING_FOR_CACHE = "WaitingForCache"  # pods start once the weights are cached
    NO_PODS = "NoPods"
    # Failures of the serving pods.
    OOM_KILLED = "OOMKilled"  # the engine was killed for memory: raise spec.resources.memory
    OUT_OF_MEMORY = "OutOfMemory"  # the engine said it could not allocate the model
    CONTAINERS_FAILING = "ContainersFailing"  # crash loops, image pulls, container errors
    WARM_UP_FAILED = "WarmUpFailed"  # a pod's engine does not answer the warm-up generation
    AS_EXPECTED = "AsExpected"  # Degraded False: nothing failed
    # Serving.
    REPLICAS_READY = "ReplicasReady"
    UNLOADED = "Unloaded"  # spec.replicas 0: requests fail at once until it is loaded again
    SCALED_TO_ZERO = "ScaledToZero"  # the autoscaler wants 0 replicas; the router holds requests
    LOADING = "Loading"  # pods exist and load or warm up the model
    NOT_SUPPORTED_BY_CLUSTER = "NotSupportedByCluster"  # the API server refuses an HPA's minReplicas 0
    # Progress.
    RECONCILING = "Reconciling"
    STABLE = "Stable"
    # A serving pod's readiness gate (naming.WARMED_UP_CONDITION).
    WARMED_UP = "WarmedUp"


# The Ready reasons that need a person: the phase is Failed until the spec or the cluster changes.
FAILED_READY_REASONS = frozenset({
    Reason.PREFETCH_FAILED, Reason.CONTAINERS_FAILING, Reason.INVALID_SPEC, Reason.OOM_KILLED,
    Reason.OUT_OF_MEMORY, Reason.CLAIM_NOT_FOUND, Reason.WARM_UP_FAILED,
})  # fmt: skip
