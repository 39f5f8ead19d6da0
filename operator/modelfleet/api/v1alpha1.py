"""InferenceModel, group modelfleet.io, version v1alpha1: the one typed source of the CRD.

Field descriptions become `kubectl explain` text; `x-kubernetes-validations` (CEL) carry the rules
that OpenAPI cannot say, each with a message that tells the user what to fix.  `crd.py` turns
these models into the CustomResourceDefinition; nothing else describes the schema.
"""

from __future__ import annotations

from dataclasses import dataclass
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

# The longest InferenceModel name: its Service is named im-<name>, and a Service name is a DNS label
# of at most 63 characters.
MAX_NAME_LENGTH = 60

# Regular expressions (RE2, as CEL's matches() reads them) of the names Kubernetes itself checks
# when the operator writes the model's children.  Checking them here refuses a bad spec when it is
# written, with a message that says what to fix, instead of a child that can never be created.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_NAME_PART = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_DNS_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
QUALIFIED_NAME = rf"^({_DNS_PREFIX}/)?{_NAME_PART}$"  # a label key, a toleration key
EXTENDED_RESOURCE = rf"^{_DNS_PREFIX}/{_NAME_PART}$"  # a fully qualified resource name
LABEL_VALUE = rf"^({_NAME_PART})?$"
# A registry host as Ollama names it in a model reference: a DNS name or IPv4 address, and an optional port.
REGISTRY_HOST = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*(:[0-9]{1,5})?$"
ENV_VAR_NAME = r"^[ -<>-~]+$"  # printable ASCII but '='
CONFIG_KEY = r"^[-._a-zA-Z0-9]+$"  # a key of a Secret or ConfigMap
# A name a client types: no control characters (C0, DEL, C1), no spaces or separators at either end.
PRINTABLE_NAME = r"^[^\p{Cc}\p{Z}]([^\p{Cc}]*[^\p{Cc}\p{Z}])?$"
NO_WHITESPACE = r"^[^\p{Cc}\p{Z}]+$"


def rules(*checks: tuple[str, str]) -> dict[str, JsonValue]:
    """`x-kubernetes-validations` from (CEL rule, message) pairs, for a field's json_schema_extra."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in checks]}


def matches(pattern: str, message: str) -> dict[str, JsonValue]:
    return rules((f"self.matches({pattern!r})", message))


DNS_SUBDOMAIN_MESSAGE = "must be a lowercase DNS subdomain name: letters, digits, '-' and '.', such as my-name"

# A Kubernetes quantity such as 20Gi, 500m or 4. YAML gives bare numbers as integers, so the
# field is int-or-string and CEL's quantity library does the checking.
Quantity = Annotated[
    int | str,
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            **rules(
                (
                    "type(self) == int ? int(self) >= 0 : "
                    "isQuantity(string(self)) && !quantity(string(self)).isLessThan(quantity('0'))",
                    "must be a non-negative Kubernetes quantity such as 20Gi, 512Mi, 500m or 4",
                )
            ),
        }
    ),
]
# A size that must be more than zero (a volume).
PositiveQuantity = Annotated[
    int | str,
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            **rules(
                (
                    "type(self) == int ? int(self) > 0 : "
                    "isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))",
                    "must be a Kubernetes quantity greater than zero, such as 20Gi",
                )
            ),
        }
    ),
]

# A model name as clients send it: an Ollama tag, a Hugging Face repo id, a path, an alias.
ModelName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=512,
        json_schema_extra=matches(
            PRINTABLE_NAME, "must be a model name such as phi3:mini: no control characters, no surrounding spaces"
        ),
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
        max_length=317,
        description="Extended resource name of the GPU, e.g. nvidia.com/gpu or amd.com/gpu.",
        json_schema_extra=rules(
            (
                f"self.matches({EXTENDED_RESOURCE!r}) && !self.startsWith('kubernetes.io/') "
                "&& !self.contains('.kubernetes.io/') && !self.startsWith('requests.')",
                "must be an extended resource name with a domain, such as nvidia.com/gpu or amd.com/gpu",
            )
        ),
    )
    cpu: Quantity | None = Field(None, description="CPU request per replica, e.g. 4 or 3500m.")
    memory: Quantity | None = Field(None, description="Memory request and limit per replica, e.g. 24Gi.")


LabelValue = Annotated[
    str,
    Field(
        max_length=63,
        json_schema_extra=matches(
            LABEL_VALUE,
            "must be a label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with a "
            "letter or digit",
        ),
    ),
]


TOLERATION_RULES: list[JsonValue] = [
    {
        "rule": "has(self.key) && self.key != '' || has(self.operator) && self.operator == 'Exists'",
        "message": "a toleration without a key must use operator Exists (it then matches every taint)",
    },
    {
        "rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
        "message": "a toleration with operator Exists must not set a value",
    },
    {
        "rule": "!has(self.tolerationSeconds) || has(self.effect) && self.effect == 'NoExecute'",
        "message": "tolerationSeconds applies only to effect NoExecute",
    },
]


class Toleration(Model):
    """A pod toleration (core/v1 Toleration)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": TOLERATION_RULES})

    key: str | None = Field(
        None,
        max_length=317,
        description="Taint key the toleration matches; empty with operator Exists matches every taint.",
        json_schema_extra=rules(
            (f"self == '' || self.matches({QUALIFIED_NAME!r})", "must be a taint key such as nvidia.com/gpu")
        ),
    )
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (the default).")
    value: LabelValue | None = Field(None, description="Taint value the toleration matches (with Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute", ""] | None = Field(
        None, description="Taint effect to match; empty matches every effect."
    )
    toleration_seconds: int | None = Field(
        None, description="How long a NoExecute toleration lets the pod stay after the taint appears."
    )


class Scheduling(Model):
    """Where the model's pods may run.  GPU models get the GPU toleration and node selector by default."""

    node_selector: dict[str, LabelValue] | None = Field(
        None,
        max_length=64,
        description="Node labels the pods require, added to the GPU node selector.",
        json_schema_extra=rules(
            (
                f"self.all(key, key.size() <= 317 && key.matches({QUALIFIED_NAME!r}))",
                "keys must be label keys such as example.com/pool or kubernetes.io/arch",
            )
        ),
    )
    tolerations: list[Toleration] | None = Field(
        None, max_length=64, description="Extra pod tolerations (core/v1 Toleration), added to the GPU toleration."
    )
    affinity: PassThroughObject | None = Field(None, description="Pod affinity rules (core/v1 Affinity).")
    priority_class_name: str | None = Field(
        None,
        max_length=253,
        description="PriorityClass of the model's pods.",
        json_schema_extra=matches(DNS_SUBDOMAIN, DNS_SUBDOMAIN_MESSAGE),
    )
    runtime_class_name: str | None = Field(
        None,
        max_length=253,
        description="RuntimeClass of the model's pods, e.g. nvidia.",
        json_schema_extra=matches(DNS_SUBDOMAIN, DNS_SUBDOMAIN_MESSAGE),
    )


class SecretKeyRef(Model):
    """A key of a Secret in the model's namespace."""

    name: str = Field(
        min_length=1,
        max_length=253,
        description="Secret name.",
        json_schema_extra=matches(DNS_SUBDOMAIN, DNS_SUBDOMAIN_MESSAGE),
    )
    key: str = Field(
        min_length=1,
        max_length=253,
        description="Key within the Secret.",
        json_schema_extra=matches(CONFIG_KEY, "must be a Secret key: letters, digits, '-', '_' or '.'"),
    )


class ConfigMapKeyRef(Model):
    """A key of a ConfigMap in the model's namespace."""

    name: str = Field(
        min_length=1,
        max_length=253,
        description="ConfigMap name.",
        json_schema_extra=matches(DNS_SUBDOMAIN, DNS_SUBDOMAIN_MESSAGE),
    )
    key: str = Field(
        min_length=1,
        max_length=253,
        description="Key within the ConfigMap.",
        json_schema_extra=matches(CONFIG_KEY, "must be a ConfigMap key: letters, digits, '-', '_' or '.'"),
    )


class Source(Model):
    """Where a model's weights come from, when not from the engine's public hub.

    Ollama: registry, an OCI registry. The prefetch Job pulls <registry>/<model> (Ollama adds the namespace
    library/ to a bare name such as gemma3:270m) and stores it under spec.model, so clients and the serving
    pods use the short name.
    vLLM: huggingFaceEndpoint, a Hugging Face-compatible hub (a mirror, or Artifactory's or Nexus's
    Hugging Face repositories). The prefetch Job downloads the repository spec.model from it, with the
    token of spec.cache.hfTokenSecretRef if set.
    """

    model_config = ConfigDict(
        json_schema_extra=rules(
            (
                "has(self.registry) != has(self.huggingFaceEndpoint)",
                "set one of registry (an OCI registry for Ollama) or huggingFaceEndpoint (a Hugging Face hub for vLLM)",
            ),
            (
                "!(has(self.insecure) && self.insecure) || !has(self.caConfigMapRef)",
                "insecure (plain HTTP) and caConfigMapRef (HTTPS with a private CA) exclude each other: "
                "set one of them",
            ),
            (
                "!has(self.huggingFaceEndpoint) || !(has(self.insecure) && self.insecure)",
                "insecure applies to a registry; a Hugging Face endpoint says http:// or https:// itself",
            ),
        )
    )

    registry: str | None = Field(
        None,
        min_length=1,
        max_length=261,
        description="Host and optional port of an OCI registry that holds Ollama models, e.g. registry.ai.svc:5000.",
        json_schema_extra=rules(
            (
                f"self.matches({REGISTRY_HOST!r})",
                "must be a registry host and optional port, such as registry.models.svc:5000 or 10.0.0.5:5000, "
                "without a scheme (http://) or a path",
            ),
            (
                f"!self.matches({REGISTRY_HOST!r}) || !self.contains(':') || "
                "int(self.split(':')[1]) >= 1 && int(self.split(':')[1]) <= 65535",
                "the registry's port must be a number from 1 to 65535",
            ),
        ),
    )
    hugging_face_endpoint: str | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description="Base URL of a Hugging Face-compatible hub, e.g. http://hf-mirror.models.svc:8090 (HF_ENDPOINT).",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHost() != ''",
                    "message": "must be an http:// or https:// URL such as http://hf-mirror.models.svc:8090",
                },
            ]
        },
    )
    insecure: bool = Field(
        False, description="Reach the registry over plain HTTP (an in-cluster or air-gapped registry without TLS)."
    )
    ca_config_map_ref: ConfigMapKeyRef | None = Field(
        None, description="ConfigMap key holding the PEM CA bundle that signed the registry's TLS certificate."
    )


AccessMode = Literal["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany", "ReadOnlyMany"]


class Cache(Model):
    """The PersistentVolumeClaim that holds the model's weights, downloaded once and reused."""

    size: PositiveQuantity = Field("20Gi", description="Size of the weights volume.")
    storage_class_name: str | None = Field(
        None,
        max_length=253,
        description="StorageClass of the claim; the cluster default if unset.",
        json_schema_extra=matches(DNS_SUBDOMAIN, DNS_SUBDOMAIN_MESSAGE),
    )
    access_mode: AccessMode = Field(
        "ReadWriteOnce",
        description=(
            "Access mode of the claim. With ReadWriteOnce every replica is scheduled onto the node that mounts "
            "the volume; use ReadWriteMany to spread replicas over nodes."
        ),
    )
    existing_claim: str | None = Field(
        None,
        max_length=253,
        description="Use this existing PersistentVolumeClaim instead of creating one.",
        json_schema_extra=matches(DNS_SUBDOMAIN, DNS_SUBDOMAIN_MESSAGE),
    )
    hf_token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding a Hugging Face token, for gated vLLM models; used only by the download."
    )


class EnvVar(Model):
    """An environment variable of the engine container (core/v1 EnvVar)."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            ("!has(self.valueFrom) || !has(self.value) || self.value == ''", "set value or valueFrom, not both")
        )
    )

    name: str = Field(
        min_length=1,
        max_length=256,
        description="Variable name.",
        json_schema_extra=matches(ENV_VAR_NAME, "must consist of printable ASCII characters other than '='"),
    )
    value: str | None = Field(None, description="Literal value.")
    value_from: PassThroughObject | None = Field(None, description="Source of the value (core/v1 EnvVarSource).")


class Engine(Model):
    """Extra settings of the inference engine."""

    args: list[str] | None = Field(
        None, description="Extra engine arguments, e.g. ['--quantization', 'awq', '--max-model-len', '8192'] for vLLM."
    )
    env: list[EnvVar] | None = Field(
        None,
        max_length=128,
        description="Extra environment variables of the engine container; each replaces the operator's of its name.",
        # Names are unique, as server-side apply needs them to be (it merges env by name).
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


class Adapter(Model):
    """A LoRA adapter of the model, served under a name of its own (vLLM)."""

    name: ModelName = Field(description="The model name clients send to get the adapter, e.g. gemma-support.")
    model: ModelName = Field(
        description=(
            "The adapter's Hugging Face repository id (from spec.source.huggingFaceEndpoint when set), or a path "
            "in the weights volume."
        )
    )


class Autoscaling(Model):
    """Horizontal autoscaling on request-queue depth.

    When enabled, the HPA sets the pods' count, and spec.replicas only says whether the model is loaded.
    """

    enabled: bool = Field(False, description="Create a HorizontalPodAutoscaler for the model.")
    min_replicas: int = Field(
        1,
        ge=0,
        le=1000,
        description=(
            "Lowest replica count the HPA may set. 0 scales an idle model to zero (metric router, "
            "Kubernetes 1.37 or later; older API servers keep 1 and say so in the ScaleToZero condition)."
        ),
    )
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
    ttl_seconds: int = Field(
        3600, ge=1, le=31536000, description="How long a cached response is served (a year at most)."
    )
    share_across_keys: bool = Field(
        False,
        description=(
            "Serve one API key's cached answers to other keys' identical requests. Off by default: a shared "
            "cache tells a caller what others asked (a hit is faster), so share only a model whose prompts "
            "are not private."
        ),
    )


class RateLimit(Model):
    """Per-API-key limits for this model, enforced by the router."""

    requests_per_minute: int | None = Field(None, ge=1, description="Requests per minute per key.")
    tokens_per_minute: int | None = Field(None, ge=1, description="Prompt plus completion tokens per minute per key.")


class Serving(Model):
    """How the router serves the model."""

    aliases: list[ModelName] | None = Field(
        None,
        max_length=64,
        description="Other names clients may use for this model.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    max_in_flight_per_replica: int = Field(
        4, ge=1, le=1024, description="Concurrent requests per ready replica; more wait in the queue."
    )
    max_queue: int = Field(
        64, ge=0, le=100000, description="Requests that may wait; beyond this the router answers 429."
    )
    request_timeout_seconds: int = Field(
        300,
        ge=1,
        le=86400,
        description=(
            "Longest time a request waits in the router's queue for a slot (then 504 queue_timeout); "
            "the generation itself is bounded by the router's upstream timeouts."
        ),
    )
    routing: Literal["prefix", "leastLoaded"] = Field(
        "prefix",
        description=(
            "How the router picks a replica. prefix: requests that share a prompt prefix (a conversation, or a "
            "long system prompt) go to the same replica, whose KV cache holds it, unless that replica has 25% more "
            "requests than the mean; leastLoaded: the replica with the fewest requests."
        ),
    )
    cache: ResponseCache | None = Field(None, description="Response cache settings.")
    rate_limit: RateLimit | None = Field(None, description="Rate limits per API key.")


@dataclass(frozen=True)
class ServingDefaults:
    """What the router does for a model whose spec.serving says nothing: the defaults of the fields above,
    read off the types so that they are written once. The router's static models default to them too."""

    max_in_flight_per_replica: int
    max_queue: int
    request_timeout_seconds: int
    routing: Literal["prefix", "leastLoaded"]
    cache_enabled: bool


_SERVING = Serving()
SERVING_DEFAULTS = ServingDefaults(
    max_in_flight_per_replica=_SERVING.max_in_flight_per_replica,
    max_queue=_SERVING.max_queue,
    request_timeout_seconds=_SERVING.request_timeout_seconds,
    routing=_SERVING.routing,
    cache_enabled=ResponseCache().enabled,
)


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
                },
                {
                    "rule": "!isURL(self) || url(self).getPort() == '' || "
                    "url(self).getPort().size() <= 5 && int(url(self).getPort()) >= 1 "
                    "&& int(url(self).getPort()) <= 65535",
                    "message": "the port must be a number from 1 to 65535",
                },
                {
                    "rule": "!self.matches('^[A-Za-z][-+.A-Za-z0-9]*://[^/?#]*@')",
                    "message": "must not carry credentials (user:password@); put the API key in apiKeySecretRef",
                },
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


# Rules on the whole object (CEL may read metadata.name there).
OBJECT_RULES: list[JsonValue] = [
    {
        "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && self.metadata.name.matches({DNS_LABEL!r})",
        "message": (
            f"metadata.name must be at most {MAX_NAME_LENGTH} lowercase letters, digits or '-', starting and "
            "ending with a letter or digit (the model's Service is named im-<name>)"
        ),
    },
]

SPEC_RULES: list[JsonValue] = [
    {
        "rule": "has(self.endpoint) || has(self.runtime)",
        "message": "spec.runtime is required (ollama or vllm) unless spec.endpoint points at an existing server",
    },
    {
        "rule": "!has(self.endpoint) || !(has(self.runtime) || has(self.image) || has(self.resources) || "
        "has(self.scheduling) || has(self.cache) || has(self.engine) || has(self.autoscaling) || has(self.source) "
        "|| has(self.adapters))",
        "message": (
            "spec.endpoint is an unmanaged backend: remove runtime, image, resources (GPUs), scheduling, cache, "
            "engine, autoscaling, source and adapters, or remove spec.endpoint to let the operator run the model"
        ),
    },
    {
        "rule": "!has(self.source) || !has(self.source.registry) || has(self.runtime) && self.runtime == 'ollama'",
        "message": (
            "spec.source.registry is an OCI registry of Ollama models and needs runtime ollama; for vLLM set "
            "spec.source.huggingFaceEndpoint"
        ),
    },
    {
        "rule": "!has(self.source) || !has(self.source.huggingFaceEndpoint) "
        "|| has(self.runtime) && self.runtime == 'vllm'",
        "message": (
            "spec.source.huggingFaceEndpoint is a Hugging Face hub and needs runtime vllm; for Ollama set "
            "spec.source.registry"
        ),
    },
    {
        "rule": "!has(self.adapters) || has(self.runtime) && self.runtime == 'vllm'",
        "message": "spec.adapters are LoRA adapters that vLLM loads: they need runtime vllm",
    },
    {
        "rule": "!has(self.autoscaling) || self.autoscaling.minReplicas <= self.autoscaling.maxReplicas",
        "message": "spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas",
    },
    {
        "rule": "!has(self.autoscaling) || self.autoscaling.minReplicas > 0 || self.autoscaling.metric == 'router'",
        "message": (
            "spec.autoscaling.minReplicas 0 needs metric 'router': an engine metric has no value while no pod "
            "runs, so nothing could bring the first replica back"
        ),
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
    model: ModelName = Field(
        description="Model to serve: an Ollama tag such as phi3:mini, or a Hugging Face repo id or path for vLLM.",
    )
    source: Source | None = Field(
        None,
        description=(
            "Where the weights come from instead of the public hub (air-gapped clusters): an OCI registry for "
            "Ollama, a Hugging Face-compatible endpoint for vLLM."
        ),
    )
    image: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="Container image overriding the runtime's default image.",
        json_schema_extra=matches(NO_WHITESPACE, "must be an image reference such as docker.io/ollama/ollama:0.17.4"),
    )
    replicas: int = Field(
        1,
        ge=0,
        le=1000,
        description=(
            "Number of replicas; 0 unloads the model (no pods, and requests for it fail at once). While "
            "autoscaling is enabled the HPA sets the count, and only 0 has an effect: it removes the HPA "
            "until replicas is above 0 again. The scale subresource sets this field."
        ),
    )
    resources: Resources | None = Field(None, description="GPUs, CPU and memory per replica.")
    scheduling: Scheduling | None = Field(None, description="Node selection, tolerations and priority.")
    cache: Cache | None = Field(None, description="The weights volume; defaults to a 20Gi ReadWriteOnce claim.")
    engine: Engine | None = Field(None, description="Extra engine arguments and environment.")
    adapters: list[Adapter] | None = Field(
        None,
        max_length=32,
        description=(
            "LoRA adapters loaded with the model (vLLM), each served under its own name through the router; "
            "the prefetch Job downloads them with the weights."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
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
    load_seconds: float | None = Field(
        None, description="Newest serving pod's scheduling until its engine answered health checks."
    )
    warmup_seconds: float | None = Field(
        None, description="Newest serving pod's engine start until it answered a warm-up generation (and was Ready)."
    )


class InferenceModelStatus(Model):
    """What is true now, as observed by the operator."""

    observed_generation: int | None = Field(None, description="The spec generation the status describes.")
    phase: Literal["Pending", "Downloading", "Loading", "Ready", "Degraded", "Failed", "Idle"] | None = Field(
        None,
        description=(
            "Summary of the conditions, for humans. Idle: no replicas; scaled to zero by the autoscaler "
            "(the router holds requests until a replica is up), or unloaded (spec.replicas 0)."
        ),
    )
    replicas: int | None = Field(None, description="Replicas that exist.")
    ready_replicas: int | None = Field(None, description="Replicas whose model answers.")
    load_replicas: int | None = Field(
        None,
        ge=1,
        description=(
            "The replicas a load restores (the router's POST /v1/admin/models/<name>/load): the last "
            "spec.replicas above 0 the operator saw."
        ),
    )
    selector: str | None = Field(None, description="Label selector of the model's pods (for the scale subresource).")
    endpoint: str | None = Field(None, description="Where the router sends this model's requests.")
    served_model: str | None = Field(
        None,
        description=(
            "The model name the router sends to the serving pods: it follows spec.model once the pods that "
            "serve the new model are all rolled out and Ready, so requests never reach a pod that lacks it."
        ),
    )
    conditions: list[Condition] | None = Field(None, description="Current conditions.")
    timings: PhaseTimings | None = Field(None, description="Time spent in each start-up phase.")
