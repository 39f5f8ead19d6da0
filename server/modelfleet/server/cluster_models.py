"""The models a cluster declares: InferenceModels, read through the contract's types, and the ready
addresses of their Services' EndpointSlices become ModelSpecs.

`models_from_cluster` is the whole mapping, pure, so it is tested without a cluster; discovery.py keeps the
live copies of both kinds it reads.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from modelfleet.api import v1alpha1
from modelfleet.api.naming import PORT_NAME, SERVICE_NAME_LABEL, child_base_name
from modelfleet.api.reading import read_spec
from modelfleet.server.model_spec import Api, Management, ModelSpec

logger = logging.getLogger(__name__)

SOURCE = "cluster"

# A key that identifies one warning about one object's state, so it is logged once, not on every event.
WarningKey = tuple[str, ...]


@dataclass(frozen=True)
class RouterPeers:
    """The Service in front of every replica of this router, and this replica's address in it.

    Each model's cap is divided among the Service's ready endpoints (ModelSpec.capacity), so that
    two routers do not each admit the full cap.
    """

    namespace: str
    service: str
    address: str

    def place(self, endpoint_slices: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
        """(how many routers share the caps, this one's index among them in address order)."""
        addresses = {self.address}
        for slice_ in endpoint_slices:
            meta = slice_.get("metadata") or {}
            if (str(meta.get("namespace", "")), (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)) == (
                self.namespace,
                self.service,
            ) and not meta.get("deletionTimestamp"):
                addresses.update(_ready_addresses(slice_))
        ordered = sorted(addresses, key=_address_order)
        return len(ordered), ordered.index(self.address)


def _address_order(address: str) -> tuple[int, int | str]:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return (2, address)
    return (parsed.version, int(parsed))


@dataclass(frozen=True)
class _Candidate:
    namespace: str
    name: str
    created: str
    body: Mapping[str, Any]


def models_from_cluster(
    inference_models: Iterable[Mapping[str, Any]],
    endpoint_slices: Iterable[Mapping[str, Any]],
    *,
    warned: set[WarningKey] | None = None,
    peers: RouterPeers | None = None,
    router_slices: Iterable[Mapping[str, Any]] = (),
) -> list[ModelSpec]:
    """The models the cluster declares, sorted by name.

    With `peers`, every model's cap is shared with the router's other ready replicas, which
    `router_slices` (the EndpointSlices of the router's Service) name.

    A model that cannot be served (a remote URL without allowRemote, a name taken by an older model in
    another namespace, a malformed spec) is left out with a warning.  Pass the same `warned` set on every
    call to log each warning once per object generation; it is updated to the warnings that still hold.
    """
    by_name: dict[str, list[_Candidate]] = {}
    for body in inference_models:
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        candidate = _Candidate(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            # RFC 3339 in UTC with second precision, so the strings sort in time order; a missing one sorts last.
            created=str(meta.get("creationTimestamp") or "~"),
            body=body,
        )
        by_name.setdefault(candidate.name, []).append(candidate)

    ready = _ready_endpoints_by_service(endpoint_slices)
    routers, router_index = peers.place(router_slices) if peers is not None else (1, 0)
    notes: dict[WarningKey, str] = {}
    specs: list[ModelSpec] = []
    for name in sorted(by_name):
        owner, *losers = sorted(by_name[name], key=lambda c: (c.created, c.namespace))
        for loser in losers:
            key: WarningKey = ("clash", loser.namespace, name, _generation(loser.body), owner.namespace)
            notes[key] = (
                f"InferenceModel {loser.namespace}/{name} is not served: the name is taken by the older "
                f"{owner.namespace}/{name}; model names must be unique across namespaces"
            )
        try:
            spec = _spec_for(owner, ready, notes)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            key = ("invalid", owner.namespace, name, _generation(owner.body))
            notes[key] = f"InferenceModel {owner.namespace}/{name} is not served: malformed spec ({exc!r})"
            continue
        if spec is not None:
            specs.append(dataclasses.replace(spec, routers=routers, router_index=router_index))

    for key, message in notes.items():
        if warned is None or key not in warned:
            logger.warning("%s", message)
    if warned is not None:
        # Keep only what still holds: bounded, and a problem that comes back is reported again.
        warned.intersection_update(notes)
        warned.update(notes)
    return specs


def _generation(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("generation", ""))


def _spec_for(
    candidate: _Candidate, ready: Mapping[tuple[str, str], tuple[str, ...]], notes: dict[WarningKey, str]
) -> ModelSpec | None:
    where = f"{candidate.namespace}/{candidate.name}"
    generation = _generation(candidate.body)
    # Typed with the CRD's own models; what a newer CRD added is left out, so that it never stops an
    # older router from serving the model.
    spec, ignored = read_spec(candidate.body.get("spec") or {})
    serving = spec.serving or v1alpha1.Serving()
    cache = serving.cache or v1alpha1.ResponseCache()
    rate_limit = serving.rate_limit or v1alpha1.RateLimit()

    api: Api
    remote = False
    managed: Management | None = None
    upstream = spec.model
    if spec.endpoint is not None:
        url = spec.endpoint.url
        host = urlsplit(url).hostname
        if not host:
            notes[("invalid", candidate.namespace, candidate.name, generation)] = (
                f"InferenceModel {where} is not served: spec.endpoint.url {url!r} has no host"
            )
            return None
        remote = not is_cluster_internal_host(host)
        if remote and not spec.endpoint.allow_remote:
            notes[("remote", candidate.namespace, candidate.name, generation)] = (
                f"InferenceModel {where} is not served: {host} is outside the cluster and "
                "spec.endpoint.allowRemote is not true"
            )
            return None
        if spec.endpoint.api_key_secret_ref is not None:
            # The router may not read Secrets (least privilege); the key has to reach it another way.
            notes[("api-key", candidate.namespace, candidate.name, generation)] = (
                f"InferenceModel {where}: spec.endpoint.apiKeySecretRef is not read by discovery; "
                "requests go to the endpoint without an API key"
            )
        api = spec.endpoint.api
        base = url.rstrip("/").removesuffix("/v1").rstrip("/")
        endpoints: tuple[str, ...] = (base,)
    elif spec.runtime is not None:
        api = "ollama" if spec.runtime == "ollama" else "openai"
        endpoints = ready.get((candidate.namespace, child_base_name(candidate.name)), ())
        # The operator names the model its pods answer to: while spec.model changes, the old pods keep
        # serving (under the old name) until the new ones are all Ready.
        status: Mapping[str, Any] = candidate.body.get("status") or {}
        upstream = str(status.get("servedModel") or upstream)
        resources = spec.resources or v1alpha1.Resources()
        managed = Management(
            replicas=spec.replicas,
            autoscaled=spec.autoscaling is not None and spec.autoscaling.enabled,
            load_replicas=int(status.get("loadReplicas") or 1),
            pods=int(status.get("replicas") or 0),
            gpus_per_replica=resources.gpu,
            gpu_resource=resources.gpu_resource,
            phase=str(status.get("phase") or ""),
        )
    else:
        notes[("invalid", candidate.namespace, candidate.name, generation)] = (
            f"InferenceModel {where} is not served: it has neither spec.endpoint.url nor a known spec.runtime"
        )
        return None

    if ignored:
        notes[("ignored", candidate.namespace, candidate.name, generation)] = (
            f"InferenceModel {where}: this router does not know {', '.join(f'spec.{path}' for path in ignored)}, "
            "and serves the model without it"
        )
    # A TTL the spec does not set is the router's default, not the CRD's.
    ttl = cache.ttl_seconds if "ttl_seconds" in cache.model_fields_set else None
    return ModelSpec(
        name=candidate.name,
        api=api,
        upstream_model=upstream,
        endpoints=endpoints,
        aliases=tuple(serving.aliases or ()),
        adapters=tuple(adapter.name for adapter in spec.adapters or ()) if spec.runtime == "vllm" else (),
        engine_metrics=spec.runtime == "vllm" and spec.endpoint is None,
        max_in_flight_per_replica=serving.max_in_flight_per_replica,
        max_queue=serving.max_queue,
        request_timeout_seconds=float(serving.request_timeout_seconds),
        remote=remote,
        cache_enabled=cache.enabled,
        cache_shared_across_keys=cache.share_across_keys,
        cache_ttl_seconds=None if ttl is None else float(ttl),
        requests_per_minute=rate_limit.requests_per_minute,
        tokens_per_minute=rate_limit.tokens_per_minute,
        source=SOURCE,
        routing=serving.routing,
        managed=managed,
        namespace=candidate.namespace,
    )


def _ready_endpoints_by_service(endpoint_slices: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], tuple[str, ...]]:
    """(namespace, service name) -> sorted, de-duplicated base URLs of the ready, non-terminating endpoints."""
    found: dict[tuple[str, str], set[str]] = {}
    for slice_ in endpoint_slices:
        meta = slice_.get("metadata") or {}
        service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not service or meta.get("deletionTimestamp"):
            continue
        urls = found.setdefault((str(meta.get("namespace", "")), str(service)), set())
        port = next((p.get("port") for p in slice_.get("ports") or () if p.get("name") == PORT_NAME), None)
        if port is None:
            continue
        for address in _ready_addresses(slice_):
            host = f"[{address}]" if ":" in address else address
            urls.add(f"http://{host}:{port}")
    return {key: tuple(sorted(urls)) for key, urls in found.items()}


def _ready_addresses(slice_: Mapping[str, Any]) -> Iterable[str]:
    for endpoint in slice_.get("endpoints") or ():
        conditions = endpoint.get("conditions") or {}
        # Per the EndpointSlice API, an unset `ready` means ready; only an explicit False does not.
        if conditions.get("ready") is False or conditions.get("terminating") is True:
            continue
        yield from (str(address) for address in endpoint.get("addresses") or ())


def is_cluster_internal_host(host: str) -> bool:
    """Whether a URL host is inside the cluster (or the node): Service DNS, single-label, localhost, private IPs."""
    host = host.strip("[]").rstrip(".").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "." not in host or host == "localhost" or host.endswith((".svc", ".cluster.local", ".localhost"))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_private or address.is_loopback or address.is_link_local
