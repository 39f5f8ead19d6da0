"""How one model is served: what discovery (from an InferenceModel) and settings (a static model) produce,
and all the rest of the router needs to know about a model.

Its serving defaults are the InferenceModel's own (modelfleet.api.v1alpha1.Serving), so a static model and
an InferenceModel that say nothing are served alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from modelfleet.api.v1alpha1 import SERVING_DEFAULTS
from modelfleet.server.routing import Routing

Api = Literal["openai", "ollama"]


@dataclass(frozen=True)
class Management:
    """What the operator runs for an InferenceModel with pods, as its spec and status say."""

    replicas: int  # spec.replicas; 0 is unloaded
    autoscaled: bool  # the HPA sets the pods' count while the model is loaded
    load_replicas: int  # status.loadReplicas: what a load restores
    pods: int  # status.replicas: the pods that exist now
    gpus_per_replica: int
    gpu_resource: str
    phase: str  # status.phase, for people

    @property
    def unloaded(self) -> bool:
        return self.replicas == 0


@dataclass(frozen=True)
class ModelSpec:
    """How one model is served; what discovery and settings produce, and all the router needs to know."""

    name: str
    api: Api
    upstream_model: str
    endpoints: tuple[str, ...]  # base URLs of the ready replicas, without /v1
    aliases: tuple[str, ...] = ()
    # LoRA adapters' names (vLLM): each resolves to this model, shares its replicas and queue, and is
    # what the backend is asked for (the engine applies the adapter).
    adapters: tuple[str, ...] = ()
    # The replicas publish vLLM's /metrics (managed vLLM models): their queue and KV cache join the
    # replica choice (engine_load.py).
    engine_metrics: bool = False
    max_in_flight_per_replica: int = SERVING_DEFAULTS.max_in_flight_per_replica
    max_queue: int = SERVING_DEFAULTS.max_queue
    request_timeout_seconds: float = SERVING_DEFAULTS.request_timeout_seconds
    # A remote provider (outside the cluster): used only by requests that set allow_remote.
    remote: bool = False
    cache_enabled: bool = SERVING_DEFAULTS.cache_enabled
    cache_ttl_seconds: float | None = None  # None: the router's default
    # One key's cached answers served to other keys (opt-in per model: see docs/architecture.md).
    cache_shared_across_keys: bool = False
    requests_per_minute: int | None = None  # None: the router's default
    tokens_per_minute: int | None = None
    upstream_api_key: str | None = field(default=None, repr=False)
    source: str = "static"  # "static", or "cluster" for InferenceModels
    # The InferenceModel's namespace: a label of modelfleet_queue_depth, which prometheus-adapter
    # matches against the namespace of the HPA that reads it.
    namespace: str = ""
    # The router replicas that share this model's cap (discovery counts the router Service's ready
    # endpoints), and this replica's place among them.
    routers: int = 1
    router_index: int = 0
    # Set for InferenceModels whose pods the operator runs (None: static, or an existing endpoint).
    managed: Management | None = None
    # How a replica is chosen: by prompt prefix with bounded load (routing.py), or the least loaded.
    routing: Routing = SERVING_DEFAULTS.routing

    @property
    def capacity(self) -> int:
        """This router's share of maxInFlightPerReplica x ready replicas.

        Every router replica admits only its share, so that the backends see the cap, not the cap
        times the number of routers. The remainder goes to the first routers in address order; a
        router whose share would be 0 (more routers than slots) keeps 1, so that none starves.
        """
        total = self.max_in_flight_per_replica * len(self.endpoints)
        if self.routers <= 1 or total == 0:
            return total
        share, remainder = divmod(total, self.routers)
        return max(1, share + (1 if self.router_index < remainder else 0))
