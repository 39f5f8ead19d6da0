"""Router settings: environment variables with the prefix MODELFLEET_, optionally a YAML model file."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, Field, HttpUrl
from pydantic_settings import BaseSettings, SettingsConfigDict


class StaticModel(BaseModel):
    """A model served from a fixed URL by an OpenAI-compatible backend (out-of-cluster use, or tests)."""

    name: str = Field(min_length=1, description="The name clients send as `model`.")
    url: HttpUrl = Field(description="Base URL of the backend, without /v1.")
    upstream_model: str | None = Field(None, description="Model name at the backend, if it differs.")
    aliases: list[str] = Field(default_factory=list, description="Other names for this model.")
    max_in_flight: int = Field(4, ge=1, description="Requests the backend runs at once; more wait in the queue.")
    max_queue: int = Field(64, ge=0, description="Requests that may wait; beyond this the router answers 429.")
    request_timeout_seconds: float = Field(300.0, gt=0, description="Longest wait in the queue.")


class RouterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELFLEET_", extra="ignore")

    config_file: Path | None = Field(None, description="YAML file with `models:`, a list of static models.")
    models: list[StaticModel] = Field(default_factory=list, description="Static models (also from config_file).")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request sets none.")
    max_tokens_cap: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted.")
    cache_size: int = Field(512, ge=0, description="Responses kept in the in-process cache; 0 turns caching off.")
    cache_ttl_seconds: float = Field(3600.0, gt=0, description="How long a cached response is served.")
    upstream_timeout_seconds: float = Field(300.0, gt=0, description="Deadline of one backend request.")
    upstream_connect_timeout_seconds: float = Field(5.0, gt=0, description="Deadline to connect to a backend.")

    def all_models(self) -> list[StaticModel]:
        """Models from the environment plus those of the config file."""
        models = list(self.models)
        if self.config_file is not None:
            document = yaml.safe_load(self.config_file.read_text()) or {}
            models += [StaticModel.model_validate(entry) for entry in document.get("models") or []]
        return models
