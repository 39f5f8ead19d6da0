"""Which models exist, where their ready replicas are, and how each one is served.

Two sources feed the registry: static models from settings (out of cluster) and, in cluster,
InferenceModels with the ready addresses of their EndpointSlices (discovery.py).  Each source
hands over its complete current list (level-based); the registry works out what appeared,
changed or vanished, so models come and go without a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Iterable

from modelfleet.server.engine_load import EngineLoad, effective_outstanding, under_pressure
from modelfleet.server.errors import MODEL_NOT_FOUND, MODEL_UNLOADED, NO_READY_REPLICA
from modelfleet.server.metrics import RouterMetrics
from modelfleet.server.model_spec import ModelSpec
from modelfleet.server.queue import ModelQueue
from modelfleet.server.routing import bounded_choice, ranked
from modelfleet.server.workers import WorkerSlot

logger = logging.getLogger(__name__)


class ServedModel:
    """A model the router serves now: its spec, its admission queue, and its replicas' load."""

    def __init__(self, spec: ModelSpec, metrics: RouterMetrics, fair_queueing: bool = True) -> None:
        self.spec = spec
        self.queue = ModelQueue(spec.name, spec.capacity, spec.max_queue, metrics, spec.namespace, fair=fair_queueing)
        self.metrics = metrics
        self.outstanding: dict[str, int] = dict.fromkeys(spec.endpoints, 0)
        # The engines' own readings (vLLM's /metrics), by replica; probe.engine_load_forever keeps them.
        self.engine_load: dict[str, EngineLoad] = {}
        self._picks = 0
        self._refuse_if_unloaded()

    @property
    def name(self) -> str:
        return self.spec.name

    def update(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.outstanding = {endpoint: self.outstanding.get(endpoint, 0) for endpoint in spec.endpoints}
        self.queue.max_queue = spec.max_queue
        self.queue.set_capacity(spec.capacity)
        self._refuse_if_unloaded()

    def _refuse_if_unloaded(self) -> None:
        """An unloaded model's requests fail at once: unlike a model scaled to zero, nothing brings a replica."""
        if self.spec.managed is not None and self.spec.managed.unloaded:
            self.queue.refuse(MODEL_UNLOADED(
                f"`{self.name}` is unloaded (its InferenceModel has spec.replicas 0); an admin can load it "
                f"with POST /v1/admin/models/{self.name}/load."
            ))  # fmt: skip
        elif self.queue.refusal is not None and self.queue.refusal.code == "model_unloaded":
            self.queue.refuse(None)

    def pick_endpoint(self, exclude: Collection[str] = (), affinity: bytes | None = None) -> str:
        """The replica for one request, counted as outstanding until `release_endpoint`.

        With prefix routing and an `affinity` key (routing.affinity_key), the key's home replica
        unless it is above the load bound; otherwise the least loaded, where ties take turns. Taking
        turns matters under light load, where every replica is often idle: always the first would
        leave the others cold (and a new replica would never get a request). `exclude` names replicas
        this request could not connect to.
        """
        if not self.outstanding:
            raise NO_READY_REPLICA(f"`{self.name}` has no ready replica.")
        candidates = {endpoint: count for endpoint, count in self.outstanding.items() if endpoint not in exclude}
        if not candidates:
            raise NO_READY_REPLICA(f"`{self.name}` has no ready replica that answers.")
        if self.engine_load:
            now = time.monotonic()
            candidates = effective_outstanding(candidates, self.engine_load, now)
            # A full KV cache is no prefix's home: it would evict what it holds to take the prefix in.
            for endpoint in under_pressure(self.engine_load, list(candidates), now):
                candidates[endpoint] = max(candidates[endpoint], self.spec.max_in_flight_per_replica)
        if affinity is not None and self.spec.routing == "prefix" and len(self.outstanding) > 1:
            endpoint, rank = bounded_choice(affinity, candidates, cap=self.spec.max_in_flight_per_replica)
            home = rank == 0 and (not exclude or endpoint == ranked(affinity, list(self.outstanding))[0])
            self.metrics.child(self.metrics.prefix_affinity, self.name, "hit" if home else "miss").inc()
        else:
            fewest = min(candidates.values())
            tied = [endpoint for endpoint, count in candidates.items() if count == fewest]
            endpoint = tied[self._picks % len(tied)]
            self._picks += 1
        self.outstanding[endpoint] += 1
        return endpoint

    def release_endpoint(self, endpoint: str) -> None:
        if endpoint in self.outstanding:
            self.outstanding[endpoint] = max(0, self.outstanding[endpoint] - 1)


class ModelRegistry:
    def __init__(self, metrics: RouterMetrics, fair_queueing: bool = True, worker: WorkerSlot | None = None) -> None:
        self.metrics = metrics
        self.fair_queueing = fair_queueing
        self.worker = worker or WorkerSlot()
        self._models: dict[str, ServedModel] = {}
        self._names: dict[str, str] = {}  # name or alias -> model name
        # Set and replaced on every change, so that waiters wake up and look again.
        self._changed = asyncio.Event()

    def replace_source(self, source: str, specs: Iterable[ModelSpec]) -> None:
        """Make the models of `source` exactly `specs`: add the new, update the changed, drop the gone.

        Static models win name clashes over cluster ones; within a source, the first spec wins.
        """
        wanted: dict[str, ModelSpec] = {}
        for spec in map(self._as_worker, specs):
            owner = self._models.get(spec.name)
            if spec.name in wanted or (owner is not None and owner.spec.source != source):
                logger.warning("model name %r is taken; ignoring the one from %s", spec.name, source)
                continue
            wanted[spec.name] = spec
        for name in [name for name, model in self._models.items() if model.spec.source == source]:
            if name not in wanted:
                removed = self._models.pop(name)
                removed.queue.close(f"The model `{name}` was removed.")
                self.metrics.forget_model(name, removed.spec.namespace)
                logger.info("model %s removed", name)
        for name, spec in wanted.items():
            current = self._models.get(name)
            if current is None:
                self._models[name] = ServedModel(spec, self.metrics, self.fair_queueing)
                logger.info("model %s added (%s, %d ready replicas)", name, source, len(spec.endpoints))
            elif current.spec != spec:
                current.update(spec)
                logger.info("model %s updated (%d ready replicas)", name, len(spec.endpoints))
        for name, spec in wanted.items():
            self.metrics.child(self.metrics.ready_replicas, name).set(len(spec.endpoints))
        self._names = {}
        for model in self._models.values():
            for name in (model.name, *model.spec.aliases, *model.spec.adapters):
                self._names.setdefault(name, model.name)
        self._changed.set()
        self._changed = asyncio.Event()

    def _as_worker(self, spec: ModelSpec) -> ModelSpec:
        """Each worker process on the port shares the cap like one more router (workers.py)."""
        if self.worker.count == 1:
            return spec
        return dataclasses.replace(spec, routers=spec.routers * self.worker.count,
                                   router_index=spec.router_index * self.worker.count + self.worker.index)  # fmt: skip

    async def wait_until(self, holds: Callable[[], bool], seconds: float) -> bool:
        """Whether `holds()` became true within `seconds`; it is checked after every change."""
        try:
            async with asyncio.timeout(seconds):
                while not holds():
                    await self._changed.wait()
        except TimeoutError:
            return holds()
        return True

    def find(self, name: str) -> ServedModel | None:
        model_name = self._names.get(name)
        return None if model_name is None else self._models[model_name]

    def resolve(self, name: str) -> ServedModel:
        model = self.find(name)
        if model is None:
            raise MODEL_NOT_FOUND(f"The model `{name}` does not exist.", param="model")
        return model

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def names(self) -> list[str]:
        return list(self._models)
