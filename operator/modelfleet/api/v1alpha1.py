"""InferenceModel, group modelfleet.io, version v1alpha1: the one typed source of the CRD.

Field descriptions become `kubectl explain` text; `x-kubernetes-validations` (CEL) carry the rules
that OpenAPI cannot say, each with a message that tells the user what to fix.  `crd.py` turns
these models into the CustomResourceDefinition; nothing else describes the schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from pydantic.alias_generators import to_camel

GROUP = "modelfleet.io"
VERSION = "v1alpha1"
KIND = "InferenceModel"
PLURAL = "inferencemodels"
SINGULAR = "inferencemodel"
SHORT_NAMES = ["im"]
CATEGORIES = ["modelfleet"]

# A Kubernetes quantity such as 20Gi, 500m or 4. YAML gives bare numbers as integers, so the
# field is int-or-string and CEL's quantity library does the checking.
Quantity = Annotated[
    int | str,
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) == int ? int(self) >= 0 : isQuantity(string(self))",
                    "message": "must be a Kubernetes quantity such as 20Gi, 512Mi, 500m or 4",
                }
            ],
        }
    ),
]

# Objects whose full Kubernetes schema we pass through untouched (the API server validates them
# again when the operator writes the pod).
PassThroughObject = Annotated[
    dict[str, Any],
    Field(json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]


class Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Resources(Model):
    """Compute for each replica of a managed model."""

    gpu: int = Field(1, ge=0, le=64, description="GPUs per replica; 0 runs on CPU only.")
    gpu_resource: str = Field(
        "nvidia.com/gpu",
        min_length=1,
        description="Extended resource name of the GPU, e.g. nvidia.com/gpu or amd.com/gpu.",
    )
    cpu: Quantity | None = Field(None, description="CPU request per replica, e.g. 4 or 3500m.")
    memory: Quantity | None = Field(None, description="Memory request and limit per replica, e.g. 24Gi.")


class Scheduling(Model):
    """Where the model's pods may run.  GPU models get the GPU toleration and node selector by default."""

    node_selector: dict[str, str] | None = Field(
        None, description="Node labels the pods require, added to the GPU node selector."
    )
    tolerations: list[PassThroughObject] | None = Field(
        None, description="Extra pod tolerations (core/v1 Toleration), added to the GPU toleration."
    )
    affinity: PassThroughObject | None = Field(None, description="Pod affinity rules (core/v1 Affinity).")
    priority_class_name: str | None = Field(None, description="PriorityClass of the model's pods.")
    runtime_class_name: str | None = Field(None, description="RuntimeClass of the model's pods, e.g. nvidia.")


class SecretKeyRef(Model):
    """A key of a Secret in the model's namespace."""

    name: str = Field(min_length=1, description="Secret name.")
    key: str = Field(min_length=1, description="Key within the Secret.")


AccessMode = Literal["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany", "ReadOnlyMany"]


class Cache(Model):
    """The PersistentVolumeClaim that holds the model's weights, downloaded once and reused."""

    size: Quantity = Field("20Gi", description="Size of the weights volume.")
    storage_class_name: str | None = Field(None, description="StorageClass of the claim; the cluster default if unset.")
    access_mode: AccessMode = Field(
        "ReadWriteOnce",
        description=(
            "Access mode of the claim. With ReadWriteOnce every replica is scheduled onto the node that mounts "
            "the volume; use ReadWriteMany to spread replicas over nodes."
        ),
    )
    existing_claim: str | None = Field(
        None, description="Use this existing PersistentVolumeClaim instead of creating one."
    )
    hf_token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding a Hugging Face token, for gated vLLM models; used only by the download."
    )


class EnvVar(Model):
    """An environment variable of the engine container (core/v1 EnvVar)."""

    name: str = Field(min_length=1, description="Variable name.")
    value: str | None = Field(None, description="Literal value.")
    value_from: PassThroughObject | None = Field(None, description="Source of the value (core/v1 EnvVarSource).")


class Engine(Model):
    """Extra settings of the inference engine."""

    args: list[str] | None = Field(
        None, description="Extra engine arguments, e.g. ['--quantization', 'awq', '--max-model-len', '8192'] for vLLM."
    )
    env: list[EnvVar] | None = Field(None, description="Extra environment variables of the engine container.")


class Autoscaling(Model):
    """Horizontal autoscaling on request-queue depth.  When enabled, the HPA owns spec.replicas."""

    enabled: bool = Field(False, description="Create a HorizontalPodAutoscaler for the model.")
    min_replicas: int = Field(1, ge=0, le=1000, description="Lowest replica count the HPA may set.")
    max_replicas: int = Field(4, ge=1, le=1000, description="Highest replica count the HPA may set.")
    target_queue_depth_per_replica: int = Field(
        4, ge=1, description="Queued requests per replica that the HPA aims for."
    )
    metric: Literal["router", "engine"] = Field(
        "router",
        description=(
            "router: the router's modelfleet_queue_depth (External metric); "
            "engine: vLLM's vllm:num_requests_waiting (Pods metric, vLLM only)."
        ),
    )
    scale_down_stabilization_seconds: int = Field(
        300, ge=0, le=3600, description="How long the HPA waits before it removes replicas."
    )


class ResponseCache(Model):
    """The router's response cache for this model."""

    enabled: bool = Field(True, description="Cache complete, successful responses.")
    ttl_seconds: int = Field(3600, ge=1, description="How long a cached response is served.")


class RateLimit(Model):
    """Per-API-key limits for this model, enforced by the router."""

    requests_per_minute: int | None = Field(None, ge=1, description="Requests per minute per key.")
    tokens_per_minute: int | None = Field(None, ge=1, description="Prompt plus completion tokens per minute per key.")


class Serving(Model):
    """How the router serves the model."""

    aliases: list[str] | None = Field(None, description="Other names clients may use for this model.")
    max_in_flight_per_replica: int = Field(
        4, ge=1, le=1024, description="Concurrent requests per ready replica; more wait in the queue."
    )
    max_queue: int = Field(
        64, ge=0, le=100000, description="Requests that may wait; beyond this the router answers 429."
    )
    request_timeout_seconds: int = Field(
        300, ge=1, le=86400, description="Deadline of one request, queue wait included."
    )
    cache: ResponseCache | None = Field(None, description="Response cache settings.")
    rate_limit: RateLimit | None = Field(None, description="Rate limits per API key.")


class Endpoint(Model):
    """An unmanaged backend: the router sends requests to this URL and the operator creates no pods."""

    url: str = Field(
        min_length=1,
        max_length=2048,
        description="Base URL of an OpenAI-compatible or Ollama server, e.g. http://ollama.ai.svc:11434.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHost() != ''",
                    "message": "must be an http:// or https:// URL such as http://ollama.models.svc:11434",
                }
            ]
        },
    )
    api: Literal["openai", "ollama"] = Field(
        "openai",
        description="The API the router speaks to it: openai (/v1, e.g. vLLM, llama.cpp) or ollama (/api/chat).",
    )
    api_key_secret_ref: SecretKeyRef | None = Field(None, description="Secret key holding the backend's API key.")
    allow_remote: bool = Field(
        False, description="Allow requests to reach this endpoint when it is outside the cluster."
    )


SPEC_RULES: list[JsonValue] = [
    {
        "rule": "has(self.endpoint) || has(self.runtime)",
        "message": "spec.runtime is required (ollama or vllm) unless spec.endpoint points at an existing server",
    },
    {
        "rule": "!has(self.endpoint) || !(has(self.runtime) || has(self.image) || has(self.resources) || "
        "has(self.scheduling) || has(self.cache) || has(self.engine) || has(self.autoscaling))",
        "message": (
            "spec.endpoint is an unmanaged backend: remove runtime, image, resources (GPUs), scheduling, cache, "
            "engine and autoscaling, or remove spec.endpoint to let the operator run the model"
        ),
    },
    {
        "rule": "!has(self.autoscaling) || self.autoscaling.minReplicas <= self.autoscaling.maxReplicas",
        "message": "spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas",
    },
    {
        "rule": "!has(self.autoscaling) || self.autoscaling.metric != 'engine' "
        "|| (has(self.runtime) && self.runtime == 'vllm')",
        "message": "spec.autoscaling.metric 'engine' needs runtime vllm; use metric 'router' for ollama",
    },
]


class InferenceModelSpec(Model):
    """Which model, on which runtime and hardware, cached where, scaled how, served with which policy."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": SPEC_RULES})

    runtime: Literal["ollama", "vllm"] | None = Field(
        None, description="Inference engine that serves the model. Required unless spec.endpoint is set."
    )
    model: str = Field(
        min_length=1,
        max_length=512,
        description="Model to serve: an Ollama tag such as phi3:mini, or a Hugging Face repo id or path for vLLM.",
    )
    image: str | None = Field(None, description="Container image overriding the runtime's default image.")
    replicas: int = Field(
        1, ge=0, le=1000, description="Number of replicas. Ignored while autoscaling is enabled (the HPA owns it)."
    )
    resources: Resources | None = Field(None, description="GPUs, CPU and memory per replica.")
    scheduling: Scheduling | None = Field(None, description="Node selection, tolerations and priority.")
    cache: Cache | None = Field(None, description="The weights volume; defaults to a 20Gi ReadWriteOnce claim.")
    engine: Engine | None = Field(None, description="Extra engine arguments and environment.")
    autoscaling: Autoscaling | None = Field(None, description="Queue-depth autoscaling.")
    serving: Serving | None = Field(None, description="Router policy: concurrency, queue, timeouts, cache, limits.")
    endpoint: Endpoint | None = Field(None, description="Serve an existing server at this URL instead of running pods.")


class Condition(Model):
    """The state of one aspect of the model, as in metav1.Condition."""

    type: str = Field(description="Ready, Scheduled, ModelCached, Progressing or Degraded.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="A CamelCase word that says why.")
    message: str = Field("", description="What is happening and what to do about it.")
    observed_generation: int | None = Field(None, description="The generation this condition describes.")
    last_transition_time: str | None = Field(None, description="When the status last changed (RFC 3339).")


class PhaseTimings(Model):
    """How long the last start took, per phase, read off the Job's and pods' timestamps (1 s resolution)."""

    download_seconds: float | None = Field(None, description="Prefetch Job start to completion.")
    schedule_seconds: float | None = Field(None, description="Newest serving pod's creation until it was scheduled.")
    load_seconds: float | None = Field(None, description="Newest serving pod's scheduling until it was Ready.")


class InferenceModelStatus(Model):
    """What is true now, as observed by the operator."""

    observed_generation: int | None = Field(None, description="The spec generation the status describes.")
    phase: Literal["Pending", "Downloading", "Loading", "Ready", "Degraded", "Failed"] | None = Field(
        None, description="Summary of the conditions, for humans."
    )
    replicas: int | None = Field(None, description="Replicas that exist.")
    ready_replicas: int | None = Field(None, description="Replicas whose model answers.")
    selector: str | None = Field(None, description="Label selector of the model's pods (for the scale subresource).")
    endpoint: str | None = Field(None, description="Where the router sends this model's requests.")
    conditions: list[Condition] | None = Field(None, description="Current conditions.")
    timings: PhaseTimings | None = Field(None, description="Time spent in each start-up phase.")
