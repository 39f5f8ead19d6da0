"""The admin API, admin keys only: what the router serves, load and unload, GPU memory.

GET  /v1/admin/models               every model: where it is served, how loaded, how it is managed
GET  /v1/admin/models/{name}        one model (where a load or unload says to poll)
POST /v1/admin/models/{name}/load   scale the InferenceModel up again (its scale subresource)
POST /v1/admin/models/{name}/unload scale it to 0: no pods, and its requests fail at once
GET  /v1/admin/gpu-memory           GPUs held per model, and an estimate of the memory the model needs
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request

from modelfleet.server.errors import (
    MODEL_AUTOSCALED,
    MODEL_NOT_FOUND,
    MODEL_NOT_MANAGED,
    ErrorBody,
    OrjsonResponse,
    error_responses,
)
from modelfleet.server.gpu_memory import gpu_memory_report
from modelfleet.server.probe import current_probe
from modelfleet.server.registry import ServedModel
from modelfleet.server.schemas import AdminModel, AdminModelAction, AdminModelList, GpuMemoryReport, LoadRequest
from modelfleet.server.services import Services, services_of

logger = logging.getLogger(__name__)

router = APIRouter(tags=["admin"])

# How long a load or unload waits for its outcome before it answers 202 (the `wait` query parameter).
DEFAULT_WAIT_SECONDS = 60.0
MAX_WAIT_SECONDS = 600.0
RETRY_AFTER = "5"


def model_state(model: ServedModel, services: Services) -> str:
    if model.spec.managed is not None and model.spec.managed.unloaded and not model.spec.endpoints:
        return "unloaded"
    if not model.spec.endpoints:
        return "no_ready_replicas"
    probe = current_probe(services, model.spec)
    if probe is not None and not probe.get("reachable"):
        return "unreachable"
    return "ready"


def engine_reading(model: ServedModel, url: str) -> dict[str, Any] | None:
    """The replica's last reading of vLLM's /metrics (engine_load.py), None where there is none."""
    reading = model.engine_load.get(url)
    if reading is None:
        return None
    return {"running": reading.running, "waiting": reading.waiting, "kv_cache_usage": reading.kv_cache_usage,
            "age_seconds": round(time.monotonic() - reading.read_at, 1)}  # fmt: skip


def describe(model: ServedModel, services: Services) -> dict[str, Any]:
    spec, queue = model.spec, model.queue
    managed = spec.managed
    return {
        "name": model.name,
        "aliases": list(spec.aliases),
        "source": spec.source,
        "api": spec.api,
        "upstream_model": spec.upstream_model,
        "remote": spec.remote,
        "state": model_state(model, services),
        "replicas": len(spec.endpoints),
        "endpoints": [
            {"url": url, "outstanding": count, "engine": engine_reading(model, url)}
            for url, count in model.outstanding.items()
        ],
        "capacity": queue.capacity,
        "in_flight": queue.in_flight,
        "queue_depth": queue.depth,
        "max_queue": queue.max_queue,
        "max_in_flight_per_replica": spec.max_in_flight_per_replica,
        "request_timeout_seconds": spec.request_timeout_seconds,
        "cache_enabled": spec.cache_enabled,
        "requests_per_minute": spec.requests_per_minute,
        "tokens_per_minute": spec.tokens_per_minute,
        "reachability": services.reachability.get(model.name),
        # How the operator runs it (None: not the operator's to load or unload).
        "managed": None
        if managed is None
        else {
            "namespace": spec.namespace,
            "replicas": managed.replicas,
            "autoscaled": managed.autoscaled,
            "load_replicas": managed.load_replicas,
            "pods": managed.pods,
            "phase": managed.phase,
        },
    }


def managed_model(services: Services, name: str) -> ServedModel:
    """The model, if load and unload apply to it: the operator runs its pods."""
    model = services.registry.resolve(name)
    if model.spec.managed is None:
        where = (
            "an existing endpoint (spec.endpoint): the operator runs no pods for it"
            if model.spec.source == "cluster"
            else "configured in the router's own settings, not by an InferenceModel"
        )
        raise MODEL_NOT_MANAGED(f"`{model.name}` cannot be loaded or unloaded: it is {where}.")
    if services.scaler is None:
        raise MODEL_NOT_MANAGED(f"`{model.name}` cannot be loaded or unloaded: this router does not watch the "
                                "cluster (MODELFLEET_KUBERNETES_DISCOVERY).")  # fmt: skip
    return model


def load_target(model: ServedModel, request: LoadRequest | None) -> int:
    """The spec.replicas a load sets: asked for, else the current count, else what the last unload left."""
    managed = model.spec.managed
    assert managed is not None
    asked = request.replicas if request is not None else None
    if asked is not None and managed.autoscaled:
        raise MODEL_AUTOSCALED(f"`{model.name}` is autoscaled (spec.autoscaling.enabled): the autoscaler sets its "
                               "replicas; load it without `replicas`.", param="replicas")  # fmt: skip
    if asked is not None:
        return asked
    return managed.replicas or managed.load_replicas


def settled(services: Services, name: str, loading: bool) -> bool:
    """Loaded: spec.replicas above 0 and a ready replica.  Unloaded: 0 and no ready replica left."""
    model = services.registry.find(name)
    if model is None or model.spec.managed is None:
        return True  # deleted meanwhile: nothing more will happen
    if loading:
        return model.spec.managed.replicas > 0 and bool(model.spec.endpoints)
    return model.spec.managed.unloaded and not model.spec.endpoints


async def scale_and_wait(services: Services, model: ServedModel, replicas: int, wait: float,
                         admin: str) -> OrjsonResponse:  # fmt: skip
    managed = model.spec.managed
    assert managed is not None
    assert services.scaler is not None
    loading = replicas > 0
    action = "load" if loading else "unload"
    if managed.replicas != replicas:
        await services.scaler.scale(model.spec.namespace, model.name, replicas)
    logger.info("%s of %s/%s by admin key %r: spec.replicas %d -> %d", action, model.spec.namespace, model.name,
                admin, managed.replicas, replicas)  # fmt: skip
    done = await services.registry.wait_until(lambda: settled(services, model.name, loading), wait)
    current = services.registry.find(model.name)
    if current is None:
        raise MODEL_NOT_FOUND(f"The model `{model.name}` was deleted during the {action}.")
    poll = f"/v1/admin/models/{model.name}"
    body = {
        "id": model.name,
        "action": action,
        "state": ("ready" if loading else "unloaded") if done else ("loading" if loading else "unloading"),
        "replicas": replicas,
        "previous_replicas": managed.replicas,
        "poll": poll,
        "model": describe(current, services),
    }
    if done:
        return OrjsonResponse(body)
    return OrjsonResponse(body, status_code=202, headers={"location": poll, "retry-after": RETRY_AFTER})


# Routes with parameters document every 4xx they return, so that FastAPI does not add its 422 (the
# router answers a request that does not validate with 400).
OTHER_REFUSALS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "Any other refusal (e.g. 405), in the same error body."}
}
ACTION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": AdminModelAction, "description": "Done: the model is Ready (load), or has no pods (unload)."},
    202: {
        "model": AdminModelAction,
        "description": "Still in progress after `wait` seconds: poll the model at `location`.",
        "headers": {
            "location": {"description": "Where to poll: GET it.", "schema": {"type": "string"}},
            "retry-after": {"description": "Seconds to wait before polling.", "schema": {"type": "string"}},
        },
    },
    **error_responses(400, 401, 403, 404, 409, 502, 503),
    **OTHER_REFUSALS,
}
WAIT = Query(DEFAULT_WAIT_SECONDS, ge=0, le=MAX_WAIT_SECONDS,
             description="Seconds to wait for the outcome before answering 202; 0 answers at once.")  # fmt: skip


@router.get("/v1/admin/models", responses={200: {"model": AdminModelList}, **error_responses(401, 403)})
async def admin_models(http_request: Request) -> OrjsonResponse:
    services = services_of(http_request)
    services.keys.require_admin(http_request)
    return OrjsonResponse(
        {"object": "list", "data": [describe(model, services) for model in services.registry.models()]}
    )


@router.get(
    "/v1/admin/models/{name}",
    responses={200: {"model": AdminModel}, **error_responses(401, 403, 404), **OTHER_REFUSALS},
)
async def admin_model(name: str, http_request: Request) -> OrjsonResponse:
    services = services_of(http_request)
    services.keys.require_admin(http_request)
    return OrjsonResponse(describe(services.registry.resolve(name), services))


@router.post("/v1/admin/models/{name}/load", responses=ACTION_RESPONSES)
async def load_model(
    name: str, http_request: Request, request: Annotated[LoadRequest | None, Body()] = None, wait: float = WAIT
) -> OrjsonResponse:
    services = services_of(http_request)
    admin = services.keys.require_admin(http_request)
    model = managed_model(services, name)
    return await scale_and_wait(services, model, load_target(model, request), wait, admin.name)


@router.post("/v1/admin/models/{name}/unload", responses=ACTION_RESPONSES)
async def unload_model(name: str, http_request: Request, wait: float = WAIT) -> OrjsonResponse:
    services = services_of(http_request)
    admin = services.keys.require_admin(http_request)
    return await scale_and_wait(services, managed_model(services, name), 0, wait, admin.name)


@router.get("/v1/admin/gpu-memory", responses={200: {"model": GpuMemoryReport}, **error_responses(401, 403)})
async def gpu_memory(http_request: Request) -> OrjsonResponse:
    services = services_of(http_request)
    services.keys.require_admin(http_request)
    return OrjsonResponse(await gpu_memory_report(services))
