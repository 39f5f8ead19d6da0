"""In-cluster discovery: InferenceModels and the ready addresses of their EndpointSlices become ModelSpecs.

`models_from_cluster` is the whole mapping, pure, so it is tested without a cluster.  `ClusterWatcher`
keeps a live copy of both kinds (list, then watch) and hands the registry the complete list after
every change.  It talks to the API server with httpx rather than the kubernetes client, whose
blocking calls would stall the router's event loop; the kubernetes package only loads credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from modelfleet.api import v1alpha1
from modelfleet.api.naming import COLLECTION_PATH, PORT_NAME, SERVICE_NAME_LABEL, child_base_name, is_child_name
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
        max_in_flight_per_replica=serving.max_in_flight_per_replica,
        max_queue=serving.max_queue,
        request_timeout_seconds=float(serving.request_timeout_seconds),
        remote=remote,
        cache_enabled=cache.enabled,
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


# The watcher ----------------------------------------------------------------------------------


def _keep_all(body: Mapping[str, Any]) -> bool:
    return True


def _is_model_slice(body: Mapping[str, Any]) -> bool:
    service = ((body.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL, "")
    return is_child_name(str(service))


@dataclass(frozen=True)
class _Kind:
    name: str
    path: str  # cluster-wide collection path; the namespaced one inserts namespaces/<ns>
    label_selector: str | None = None
    keeps: Callable[[Mapping[str, Any]], bool] = _keep_all
    # Watched in this namespace whatever the watcher's (the router's own Service).
    namespace: str | None = None

    def url(self, namespace: str | None) -> str:
        namespace = self.namespace or namespace
        if namespace is None:
            return self.path
        prefix, _, plural = self.path.rpartition("/")
        return f"{prefix}/namespaces/{namespace}/{plural}"


ROUTER_SLICES = "router-endpointslices"
INFERENCE_MODELS = _Kind("inferencemodels", COLLECTION_PATH)
# A label selector cannot match a prefix: the server sends Service-owned slices only, and we keep im-*.
ENDPOINT_SLICES = _Kind(
    "endpointslices", "/apis/discovery.k8s.io/v1/endpointslices", SERVICE_NAME_LABEL, keeps=_is_model_slice
)


class _Expired(Exception):
    """The resourceVersion is too old (410 Gone): only a fresh list can continue."""


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass
class ApiServer:
    """How to reach the API server; the token is asked for on every request, so rotation is picked up."""

    base_url: str
    tls: ssl.SSLContext
    proxy: str | None
    sni_hostname: str | None
    authorization: Callable[[], str | None]

    def client(self) -> httpx.AsyncClient:
        # Env proxies are for the router's upstream traffic, not for the API server.
        return httpx.AsyncClient(
            base_url=self.base_url, verify=self.tls, proxy=self.proxy, trust_env=False, timeout=httpx.Timeout(30.0)
        )

    def request_options(self) -> dict[str, Any]:
        """Headers (with a current token) and TLS server name for one request."""
        headers = {"Accept": "application/json"}
        token = self.authorization()
        if token:
            headers["Authorization"] = token
        extensions = {"sni_hostname": self.sni_hostname} if self.sni_hostname else None
        return {"headers": headers, "extensions": extensions}


def load_api_server(kubeconfig: str | None) -> ApiServer:
    """Credentials from the pod's ServiceAccount in cluster, else from a kubeconfig file (blocking)."""
    # Imported here: a router that serves only static models never needs the kubernetes package.
    from kubernetes import client, config

    cfg = client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        # The loader installs a hook that re-reads the rotated token file (at most once a minute).
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]

    tls = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None, cadata=cfg.ca_cert_data or None)
    if cfg.cert_file:
        tls.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    if not cfg.verify_ssl:
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE

    def authorization() -> str | None:
        # Runs the configuration's refresh hook (in-cluster token file, exec plugins) before answering.
        value: str | None = cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
        return value

    return ApiServer(
        base_url=str(cfg.host),
        tls=tls,
        proxy=cfg.proxy or None,
        sni_hostname=cfg.tls_server_name or None,
        authorization=authorization,
    )


@dataclass
class _Connection:
    http: httpx.AsyncClient
    server: ApiServer


class ClusterWatcher:
    """Keeps InferenceModels and EndpointSlices in memory and reports the resulting models on every change.

    `on_change` gets the complete list (`models_from_cluster`) on the event loop, once both kinds have
    been listed and then after every change that alters it; `synced` is set after the first delivery.
    While the API server cannot be reached the last delivered list stands, and `healthy` is False.
    """

    LIST_PAGE_SIZE = 500
    BACKOFF_INITIAL_SECONDS = 0.5
    BACKOFF_MAX_SECONDS = 10.0

    def __init__(
        self,
        on_change: Callable[[list[ModelSpec]], None],
        namespace: str | None = None,
        kubeconfig: str | None = None,
        debounce_seconds: float = 0.05,
        watch_timeout_seconds: int = 290,
        peers: RouterPeers | None = None,
    ) -> None:
        self.on_change = on_change
        self.namespace = namespace
        self.peers = peers
        self._kinds = [INFERENCE_MODELS, ENDPOINT_SLICES]
        if peers is not None:
            # The router's own replicas, wherever the models are watched.
            self._kinds.append(
                _Kind(
                    ROUTER_SLICES,
                    ENDPOINT_SLICES.path,
                    f"{SERVICE_NAME_LABEL}={peers.service}",
                    namespace=peers.namespace,
                )
            )
        self.kubeconfig = kubeconfig
        self.debounce_seconds = debounce_seconds
        self.watch_timeout_seconds = watch_timeout_seconds
        self.synced = asyncio.Event()
        self._stores: dict[str, dict[str, dict[str, Any]]] = {kind.name: {} for kind in self._kinds}
        self._listed: set[str] = set()
        self._failing: set[str] = set()
        self._dirty = asyncio.Event()
        self._warned: set[WarningKey] = set()
        self._delivered: list[ModelSpec] | None = None

    @property
    def healthy(self) -> bool:
        """False while a list or watch is failing and the watcher is backing off."""
        return not self._failing

    async def run(self) -> None:
        """List and watch until cancelled; API failures are retried forever with backoff.

        Raises only if no credentials can be loaded (no kubeconfig, and not in a pod).
        """
        # Loading a kubeconfig may run an exec credential plugin, which blocks.
        server = await asyncio.to_thread(load_api_server, self.kubeconfig)
        async with server.client() as http:
            connection = _Connection(http, server)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._deliver_forever())
                for kind in self._kinds:
                    tasks.create_task(self._reflect_forever(connection, kind))

    def _mark_dirty(self) -> None:
        self._dirty.set()

    async def _deliver_forever(self) -> None:
        while True:
            await self._dirty.wait()
            # Coalesce a burst (a relist, a rollout) into one recomputation.
            await asyncio.sleep(self.debounce_seconds)
            self._dirty.clear()
            if len(self._listed) < len(self._stores):
                # Half a picture (models without their endpoints) would make ready models look empty.
                continue
            models = models_from_cluster(
                self._stores[INFERENCE_MODELS.name].values(),
                self._stores[ENDPOINT_SLICES.name].values(),
                warned=self._warned,
                peers=self.peers,
                router_slices=self._stores.get(ROUTER_SLICES, {}).values(),
            )
            if models == self._delivered:
                self.synced.set()
                continue
            try:
                self.on_change(models)
            except Exception:
                logger.exception("the discovery callback failed; it is called again on the next change")
                continue
            self._delivered = models
            self.synced.set()

    async def _reflect_forever(self, connection: _Connection, kind: _Kind) -> None:
        backoff = self.BACKOFF_INITIAL_SECONDS
        while True:
            try:
                version = await self._list(connection, kind)
                self._failing.discard(kind.name)
                while True:
                    # A watch that the server ends (timeoutSeconds) resumes where it stopped.
                    version = await self._watch(connection, kind, version)
                    # Reset only now: a list that works followed by a watch that fails must still back off.
                    backoff = self.BACKOFF_INITIAL_SECONDS
                    logger.debug("watch of %s ended; resuming at resourceVersion %s", kind.name, version)
            except _Expired:
                logger.info("watch of %s expired; listing again", kind.name)
            except Exception as exc:
                self._failing.add(kind.name)
                if isinstance(exc, httpx.HTTPError | _ApiError | ValueError):
                    # ValueError: a body that is not JSON, from a proxy or a cut stream.
                    logger.warning("watching %s failed (%s); retrying in %.1fs", kind.name, exc, backoff)
                else:
                    # A bug must not end discovery for good: the router would serve a stale list forever.
                    logger.exception("watching %s failed unexpectedly; retrying in %.1fs", kind.name, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.BACKOFF_MAX_SECONDS)

    def _request_args(self, connection: _Connection, kind: _Kind, **params: str | int) -> dict[str, Any]:
        if kind.label_selector is not None:
            params["labelSelector"] = kind.label_selector
        return {"params": params, **connection.server.request_options()}

    async def _list(self, connection: _Connection, kind: _Kind) -> str:
        """Replace the store with a full, paginated list; return the list's resourceVersion."""
        items: dict[str, dict[str, Any]] = {}
        token = ""
        while True:
            params: dict[str, str | int] = {"limit": self.LIST_PAGE_SIZE}
            if token:
                params["continue"] = token
            response = await connection.http.get(
                kind.url(self.namespace), **self._request_args(connection, kind, **params)
            )
            _raise_for_status(response)
            body = response.json()
            for item in body.get("items") or ():
                if kind.keeps(item):
                    items[item["metadata"]["uid"]] = _slim(item)
            token = (body.get("metadata") or {}).get("continue") or ""
            if not token:
                break
        self._stores[kind.name] = items
        self._listed.add(kind.name)
        self._mark_dirty()
        return str(body["metadata"]["resourceVersion"])

    async def _watch(self, connection: _Connection, kind: _Kind, version: str) -> str:
        """Apply one watch stream's events until the server ends it; return the last resourceVersion seen."""
        args = self._request_args(
            connection, kind,
            watch=1, allowWatchBookmarks="true", resourceVersion=version, timeoutSeconds=self.watch_timeout_seconds,
        )  # fmt: skip
        # Between events the stream is silent (bookmarks come about once a minute), so only the server's
        # own timeout bounds it; the read timeout is a backstop for a connection that died unnoticed.
        timeout = httpx.Timeout(30.0, read=self.watch_timeout_seconds + 60.0)
        store = self._stores[kind.name]
        async with connection.http.stream("GET", kind.url(self.namespace), timeout=timeout, **args) as response:
            if response.status_code != 200:
                await response.aread()
            _raise_for_status(response)
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                kind_of_event, body = event.get("type"), event.get("object") or {}
                if kind_of_event == "ERROR":
                    if body.get("code") == 410:
                        raise _Expired()
                    raise _ApiError(int(body.get("code") or 0), str(body.get("message", "")))
                version = str((body.get("metadata") or {}).get("resourceVersion") or version)
                if kind_of_event == "BOOKMARK":
                    continue
                uid = body["metadata"]["uid"]
                if kind_of_event == "DELETED" or not kind.keeps(body):
                    changed = store.pop(uid, None) is not None
                else:
                    store[uid] = _slim(body)
                    changed = True
                if changed:
                    self._mark_dirty()
        return version


def _slim(body: dict[str, Any]) -> dict[str, Any]:
    """Drop managedFields: the bulk of most objects, and never read here."""
    with contextlib.suppress(AttributeError):
        body.get("metadata", {}).pop("managedFields", None)
    return body


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code == 200:
        return
    if response.status_code == 410:
        raise _Expired()
    try:
        message = str(response.json().get("message", ""))
    except ValueError:
        message = response.reason_phrase
    raise _ApiError(response.status_code, message)
