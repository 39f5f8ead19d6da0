"""Router settings: environment variables with the prefix MODELFLEET_, optionally a YAML model file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, HttpUrl, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from modelfleet.api.v1alpha1 import SERVING_DEFAULTS
from modelfleet.server.http_limits import (
    DEFAULT_HEADER_TIMEOUT_SECONDS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEADER_BYTES,
)
from modelfleet.server.model_spec import ModelSpec
from modelfleet.server.routing import Routing


class StaticModel(BaseModel):
    """A model served from a fixed URL (out-of-cluster use, or tests)."""

    name: str = Field(min_length=1, description="The name clients send as `model`.")
    url: HttpUrl = Field(description="Base URL of the backend, without /v1.")
    replica_urls: list[HttpUrl] = Field(
        default_factory=list, description="Base URLs of more replicas of the same backend (see `routing`)."
    )
    api: Literal["openai", "ollama"] = Field("openai", description="openai (/v1/...) or ollama (/api/chat).")
    upstream_model: str | None = Field(None, description="Model name at the backend, if it differs.")
    aliases: list[str] = Field(default_factory=list, description="Other names for this model.")
    max_in_flight: int = Field(
        SERVING_DEFAULTS.max_in_flight_per_replica,
        ge=1,
        description="Requests each replica runs at once; more wait in the queue.",
    )
    max_queue: int = Field(
        SERVING_DEFAULTS.max_queue, ge=0, description="Requests that may wait; beyond this the router answers 429."
    )
    request_timeout_seconds: float = Field(
        SERVING_DEFAULTS.request_timeout_seconds, gt=0, description="Longest wait in the queue."
    )
    remote: bool = Field(False, description="A remote provider: used only by requests that set allow_remote.")
    cache_enabled: bool = Field(SERVING_DEFAULTS.cache_enabled, description="Cache this model's deterministic answers.")
    cache_ttl_seconds: float | None = Field(None, gt=0, description="Cache TTL for this model (default: the router's).")
    cache_shared_across_keys: bool = Field(
        False, description="Serve one key's cached answers to other keys (a privacy trade-off; off by default)."
    )
    requests_per_minute: int | None = Field(None, ge=0, description="Per-key request limit (default: the router's).")
    tokens_per_minute: int | None = Field(None, ge=0, description="Per-key token limit (default: the router's).")
    api_key: SecretStr | None = Field(None, description="Bearer token the backend expects.")
    routing: Routing = Field(
        SERVING_DEFAULTS.routing,
        description="prefix: requests sharing a prompt prefix go to the same replica (its KV cache), within a load "
        "bound; leastLoaded: the replica with the fewest requests.",
    )

    def spec(self) -> ModelSpec:
        return ModelSpec(
            name=self.name,
            api=self.api,
            upstream_model=self.upstream_model or self.name,
            endpoints=tuple(str(url).rstrip("/") for url in (self.url, *self.replica_urls)),
            aliases=tuple(self.aliases),
            max_in_flight_per_replica=self.max_in_flight,
            max_queue=self.max_queue,
            request_timeout_seconds=self.request_timeout_seconds,
            remote=self.remote,
            cache_enabled=self.cache_enabled,
            cache_ttl_seconds=self.cache_ttl_seconds,
            cache_shared_across_keys=self.cache_shared_across_keys,
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
            upstream_api_key=self.api_key.get_secret_value() if self.api_key else None,
            source="static",
            routing=self.routing,
        )


class RouterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELFLEET_", extra="ignore")

    # Models
    config_file: Path | None = Field(None, description="YAML file with `models:`, a list of static models.")
    models: list[StaticModel] = Field(default_factory=list, description="Static models (also from config_file).")
    kubernetes_discovery: bool = Field(False, description="Watch InferenceModels and EndpointSlices for models.")
    kubernetes_namespace: str | None = Field(None, description="Watch one namespace only (default: all).")
    kubeconfig: Path | None = Field(None, description="Kubeconfig for discovery (default: in-cluster, $KUBECONFIG).")
    router_service: str | None = Field(
        None,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description=(
            "namespace/name of the Service in front of every router replica: with discovery and pod_ip, "
            "each model's cap is divided among its ready endpoints, so the backends see the cap once."
        ),
    )
    pod_ip: str | None = Field(None, description="This replica's address in router_service (the downward API's).")
    default_model: str | None = Field(None, description="Model of /v1/generate and /infer requests that name none.")
    # Requests
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request sets none.")
    max_tokens_cap: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_prompt_chars: int = Field(
        200_000,
        ge=1,
        description="Longest prompt a request may send (all its text, "
        "in characters); longer ones get 400 prompt_too_long without reaching a backend.",
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted.")
    heartbeat_seconds: float = Field(10.0, gt=0, description="`: ping` interval of a stream that waits in the queue.")
    queue_policy: Literal["fair", "fifo"] = Field(
        "fair",
        description=(
            "How a busy model's waiting requests are ordered: fair (across API keys by weight, interactive "
            "before batch) or fifo (arrival order; for comparison)."
        ),
    )
    # Cache
    cache_size: int = Field(512, ge=0, description="Responses kept in the in-process cache; 0 turns caching off.")
    cache_ttl_seconds: float = Field(3600.0, gt=0, description="How long a cached response is served.")
    cache_per_key: bool = Field(
        True,
        description="Give each API key its own cache namespace (a model may still share its answers across keys: "
        "serving.cache.shareAcrossKeys, or cache_shared_across_keys of a static model). false shares every model's.",
    )
    sampled_cache_routes: list[str] = Field(
        default_factory=lambda: ["/v1/generate", "/v1/generate/stream", "/infer"],
        description=(
            "Routes whose answers are cached whatever their temperature, as the systems these APIs come from "
            "did (a repeated prompt is answered from the cache); the others cache only deterministic requests "
            "(temperature 0, or a seed). A JSON list; [] makes every route deterministic-only."
        ),
    )
    redis_url: str | None = Field(None, description="Redis for a shared cache and rate limits (default: in-process).")
    # Rate limits
    rate_limit_requests_per_minute: int = Field(100, ge=0, description="Requests per key (or client IP) per model "
                                                "per minute; 0 turns the limit off.")  # fmt: skip
    rate_limit_tokens_per_minute: int = Field(0, ge=0, description="Prompt + completion tokens per key per model "
                                              "per minute; 0 turns the limit off.")  # fmt: skip
    rate_limit_window_seconds: float = Field(60.0, gt=0, description="Length of the sliding window the per-minute "
                                             "limits apply to (shorter only for tests).")  # fmt: skip
    rate_limit_failure_mode: Literal["open", "closed"] = Field(
        "open", description="When Redis is down: open admits requests unlimited, closed refuses them with 503."
    )
    # Auth
    auth_required: bool = Field(True, description="Refuse requests without a valid API key.")
    api_keys_file: Path | None = Field(None, description="YAML/JSON file of API keys (see auth.py).")
    # Connections (each router process; see http_limits.py)
    max_header_bytes: int = Field(
        DEFAULT_MAX_HEADER_BYTES,
        ge=1024,
        description="Largest request line plus headers, in bytes; a longer one gets 431 and its connection is closed.",
    )
    header_timeout_seconds: float = Field(
        DEFAULT_HEADER_TIMEOUT_SECONDS,
        gt=0,
        description="Time a request's headers may take, from the connection's opening (first request) or the "
        "request's first byte; then 408 and the connection is closed (idle ones without an answer).",
    )
    max_connections: int = Field(
        DEFAULT_MAX_CONNECTIONS,
        ge=1,
        description="Open connections per router process; one more is accepted and closed at once, unanswered.",
    )
    # Upstreams
    upstream_timeout_seconds: float = Field(300.0, gt=0, description="Deadline of one backend request.")
    upstream_connect_timeout_seconds: float = Field(5.0, gt=0, description="Deadline to connect to a backend.")
    # Observability
    opentelemetry: bool = Field(
        False,
        description=(
            "FastAPI's OpenTelemetry spans, metrics and logs, through the globally configured providers (set "
            "up with opentelemetry-instrument, for example). Off, no request pays for the provider checks."
        ),
    )

    def all_models(self) -> list[StaticModel]:
        """Models from the environment plus those of the config file."""
        models = list(self.models)
        if self.config_file is not None:
            document = yaml.safe_load(self.config_file.read_text()) or {}
            models += [StaticModel.model_validate(entry) for entry in document.get("models") or []]
        return models
