"""In-cluster discovery: a live copy of InferenceModels and EndpointSlices (list, then watch, as client-go's
reflector does), and the registry handed the complete list of models after every change.

What the copies mean is cluster_models.py's; how to reach the API server is kube_api.py's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from modelfleet.api.naming import COLLECTION_PATH, SERVICE_NAME_LABEL, is_child_name
from modelfleet.server.cluster_models import RouterPeers, WarningKey, models_from_cluster
from modelfleet.server.kube_api import ApiError, ApiServer, Expired, load_api_server, raise_for_status, slim
from modelfleet.server.model_spec import ModelSpec

logger = logging.getLogger(__name__)


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
            except Expired:
                logger.info("watch of %s expired; listing again", kind.name)
            except Exception as exc:
                self._failing.add(kind.name)
                if isinstance(exc, httpx.HTTPError | ApiError | ValueError):
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
            raise_for_status(response)
            body = response.json()
            for item in body.get("items") or ():
                if kind.keeps(item):
                    items[item["metadata"]["uid"]] = slim(item)
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
            raise_for_status(response)
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                kind_of_event, body = event.get("type"), event.get("object") or {}
                if kind_of_event == "ERROR":
                    if body.get("code") == 410:
                        raise Expired()
                    raise ApiError(int(body.get("code") or 0), str(body.get("message", "")))
                version = str((body.get("metadata") or {}).get("resourceVersion") or version)
                if kind_of_event == "BOOKMARK":
                    continue
                uid = body["metadata"]["uid"]
                if kind_of_event == "DELETED" or not kind.keeps(body):
                    changed = store.pop(uid, None) is not None
                else:
                    store[uid] = slim(body)
                    changed = True
                if changed:
                    self._mark_dirty()
        return version
