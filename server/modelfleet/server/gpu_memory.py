"""GET /v1/admin/gpu-memory: the GPUs each model's pods request, and what the model needs in memory.

Three figures per model, each only where it is known:
- `gpus`: spec.resources.gpu x the pods that exist (operator-run models);
- `estimate`: weights plus KV cache at the model's concurrency and context length, from the
  architecture the engine reports (Ollama's /api/show; an OpenAI-compatible server reports none);
- `loaded`: what the engine itself says each replica holds now (Ollama's /api/ps), which also counts
  the compute buffers the estimate leaves out.
Remote providers are never asked.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson

from modelfleet.server.backends.base import request_headers
from modelfleet.server.model_spec import ModelSpec
from modelfleet.server.services import Services
from modelfleet.server.upstream import UpstreamError

ASK_DEADLINE_SECONDS = 3.0
# Ollama and llama.cpp keep the KV cache in f16 unless told otherwise (OLLAMA_KV_CACHE_TYPE).
KV_BYTES_PER_ELEMENT = 2


@dataclass(frozen=True)
class Architecture:
    """What sizes the KV cache, from GGUF metadata (`<arch>.block_count` and so on)."""

    name: str
    layers: int
    kv_heads: int
    key_length: int
    value_length: int
    trained_context_length: int | None
    sliding_window: int | None

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token in every layer."""
        return self.layers * self.kv_heads * (self.key_length + self.value_length) * KV_BYTES_PER_ELEMENT


def architecture_of(model_info: dict[str, Any]) -> Architecture | None:
    """The KV-cache dimensions from Ollama's model_info; None when any of them is missing."""
    arch = model_info.get("general.architecture")
    if not isinstance(arch, str):
        return None

    def number(key: str) -> int | None:
        value = model_info.get(f"{arch}.{key}")
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    layers, heads = number("block_count"), number("attention.head_count")
    kv_heads = number("attention.head_count_kv") or heads
    embedding = number("embedding_length")
    # Without explicit key and value lengths, a head is the embedding split over the heads.
    fallback = embedding // heads if embedding and heads else None
    key_length = number("attention.key_length") or fallback
    value_length = number("attention.value_length") or fallback
    if not (layers and kv_heads and key_length and value_length):
        return None
    return Architecture(arch, layers, kv_heads, key_length, value_length, number("context_length"),
                        number("attention.sliding_window"))  # fmt: skip


def estimate(weights_bytes: int, architecture: Architecture, context_length: int, concurrency: int) -> dict[str, Any]:
    """Weights plus a KV cache for `concurrency` sequences of `context_length` tokens.

    An upper bound for the cache: every layer is counted at the full context, although models with
    sliding-window layers (Gemma 3, for one) keep only the window in those.
    """
    kv_cache = architecture.kv_bytes_per_token * context_length * concurrency
    return {
        "weights_bytes": weights_bytes,
        "kv_cache_bytes": kv_cache,
        "total_bytes": weights_bytes + kv_cache,
        "kv_bytes_per_token": architecture.kv_bytes_per_token,
        "context_length": context_length,
        "concurrency": concurrency,
    }


async def ask(services: Services, spec: ModelSpec, method: str, url: str, body: Any = None) -> Any | None:
    """The JSON answer, or None if the server does not answer it (another engine, down, slow)."""
    try:
        status, _, content = await services.http.fetch(method, url, request_headers(spec, "application/json"),
                                                       None if body is None else orjson.dumps(body),
                                                       deadline=ASK_DEADLINE_SECONDS)  # fmt: skip
        return orjson.loads(content) if status == 200 else None
    except (UpstreamError, orjson.JSONDecodeError):
        return None


def ollama_entry(listing: Any, name: str) -> dict[str, Any] | None:
    """This model's entry in Ollama's /api/tags or /api/ps list."""
    models = listing.get("models") if isinstance(listing, dict) else None
    for entry in models or ():
        if isinstance(entry, dict) and name in (entry.get("name"), entry.get("model")):
            return entry
    return None


async def engine_report(services: Services, spec: ModelSpec) -> dict[str, Any]:
    """Architecture, estimate and loaded sizes, as far as the model's engine reports them."""
    if spec.remote:
        return {"note": "a remote provider: not asked"}
    if not spec.endpoints:
        return {"note": "no ready replica to ask"}
    first = spec.endpoints[0]
    shown, tags, *running = await asyncio.gather(
        ask(services, spec, "POST", f"{first}/api/show", {"model": spec.upstream_model}),
        ask(services, spec, "GET", f"{first}/api/tags"),
        *(ask(services, spec, "GET", f"{endpoint}/api/ps") for endpoint in spec.endpoints),
    )
    loaded: list[dict[str, Any]] = []
    for endpoint, listing in zip(spec.endpoints, running, strict=True):
        entry = ollama_entry(listing, spec.upstream_model)
        if entry is not None:
            loaded.append({"endpoint": endpoint, "size_bytes": entry.get("size"), "vram_bytes": entry.get("size_vram"),
                           "context_length": entry.get("context_length")})  # fmt: skip
    shown = shown if isinstance(shown, dict) else {}
    architecture = architecture_of(shown.get("model_info") or {})
    tagged = ollama_entry(tags, spec.upstream_model)
    report: dict[str, Any] = {"loaded": loaded, "architecture": None, "estimate": None}
    if architecture is None or tagged is None or not isinstance(tagged.get("size"), int):
        report["note"] = "the engine does not report the model's architecture (only Ollama's /api/show does)"
        return report
    report["architecture"] = {
        "name": architecture.name,
        "parameter_count": (shown.get("model_info") or {}).get("general.parameter_count"),
        "quantization": (shown.get("details") or {}).get("quantization_level"),
        "layers": architecture.layers,
        "kv_heads": architecture.kv_heads,
        "key_length": architecture.key_length,
        "value_length": architecture.value_length,
        "trained_context_length": architecture.trained_context_length,
        "sliding_window": architecture.sliding_window,
    }
    # The context the engine runs with, once it has loaded the model; before, the trained maximum.
    contexts = [int(entry["context_length"]) for entry in loaded if isinstance(entry.get("context_length"), int)]
    context_length = contexts[0] if contexts else architecture.trained_context_length
    if context_length:
        report["estimate"] = estimate(tagged["size"], architecture, context_length, spec.max_in_flight_per_replica)
    return report


async def model_report(services: Services, spec: ModelSpec) -> dict[str, Any]:
    managed = spec.managed
    return {
        "model": spec.name,
        "namespace": spec.namespace or None,
        "source": spec.source,
        "gpu_resource": managed.gpu_resource if managed else None,
        "gpus_per_replica": managed.gpus_per_replica if managed else None,
        "pods": managed.pods if managed else None,
        # Requested by the pods that exist; a pending pod's GPUs are not held yet.
        "gpus": managed.gpus_per_replica * managed.pods if managed else None,
        **await engine_report(services, spec),
    }


async def gpu_memory_report(services: Services) -> dict[str, Any]:
    specs = [model.spec for model in services.registry.models()]
    models = await asyncio.gather(*(model_report(services, spec) for spec in specs))
    by_resource: dict[str, int] = {}
    for report in models:
        if report["gpus"]:
            by_resource[report["gpu_resource"]] = by_resource.get(report["gpu_resource"], 0) + report["gpus"]
    return {"object": "gpu_memory", "models": list(models), "gpus": by_resource}
