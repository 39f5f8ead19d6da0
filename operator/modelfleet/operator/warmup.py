"""Warm-up: a new model pod counts as Ready only after it has answered a real generation.

An engine's health endpoint answers before the model is in memory (Ollama loads weights on the first
request; vLLM compiles and captures graphs on its first batches), so a pod that passes its probes may
still keep the first request waiting for minutes. The serving pods carry a readiness gate
(`modelfleet.io/warmed-up`): the operator sends each new pod one short generation, and sets the
condition when it answers. Until then the pod is not Ready, its EndpointSlice address is not ready,
and the router sends it nothing. Probes stay cheap: they never generate.

Warm-ups run on a small thread pool, never inside a reconcile: loading large weights takes minutes.
A failed warm-up sets the condition False with the engine's own error, and is retried with a
growing delay, so a pod that cannot load its model (too little memory) does not load it in a loop.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from modelfleet.api.conditions import Reason
from modelfleet.api.naming import SERVED_MODEL_ANNOTATION, WARMED_UP_CONDITION

Manifest = dict[str, Any]
logger = logging.getLogger(__name__)

PROMPT = "Hello"
FIRST_RETRY_SECONDS = 10.0
MAX_RETRY_SECONDS = 300.0


@dataclass(frozen=True)
class WarmUpRequest:
    """One short generation, addressed to one pod."""

    namespace: str
    pod: str
    uid: str
    url: str
    body: Manifest


def warmup_request(pod: Manifest, runtime: str, port: int) -> WarmUpRequest | None:
    """The request that warms this pod up, or None when it needs none or cannot take one yet."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    gated = any(gate.get("conditionType") == WARMED_UP_CONDITION for gate in spec.get("readinessGates") or ())
    model = (meta.get("annotations") or {}).get(SERVED_MODEL_ANNOTATION)
    if not gated or not model or meta.get("deletionTimestamp") or status.get("phase") != "Running":
        return None
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or ()}
    if conditions.get("ContainersReady") != "True" or conditions.get(WARMED_UP_CONDITION) == "True":
        return None
    address = status.get("podIP")
    if not address:
        return None
    host = f"[{address}]" if ":" in address else address
    if runtime == "ollama":
        # keep_alive -1: the model stays loaded, as the server's OLLAMA_KEEP_ALIVE says too.
        url = f"http://{host}:{port}/api/generate"
        body: Manifest = {"model": model, "prompt": PROMPT, "stream": False, "keep_alive": -1,
                          "options": {"num_predict": 1}}  # fmt: skip
    else:
        url = f"http://{host}:{port}/v1/completions"
        body = {"model": model, "prompt": PROMPT, "max_tokens": 1}
    return WarmUpRequest(namespace=meta["namespace"], pod=meta["name"], uid=meta.get("uid", ""), url=url, body=body)


def engine_error(exc: Exception) -> str:
    """The engine's own words for a failed request, where it gave some."""
    if isinstance(exc, urllib.error.HTTPError):
        try:
            detail = json.loads(exc.read() or b"{}")
        except ValueError:
            detail = {}
        message = detail.get("error") if isinstance(detail, dict) else None
        if isinstance(message, dict):  # OpenAI-style {"error": {"message": ...}}
            message = message.get("message")
        return f"HTTP {exc.code}: {message or exc.reason}"
    reason = getattr(exc, "reason", None)
    return str(reason or exc)


# A pod that cannot be reached is known within seconds; only the generation may take long.
CONNECT_TIMEOUT_SECONDS = 5.0


def send(request: WarmUpRequest, timeout: float) -> None:
    """Send the generation straight to the pod (no proxy); raises on any failure.

    http.client rather than urllib: the connection gets a short timeout and the answer a long one.
    """
    url = urllib.parse.urlsplit(request.url)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=CONNECT_TIMEOUT_SECONDS)
    try:
        connection.connect()
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        connection.request("POST", url.path, json.dumps(request.body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read()
        if response.status >= 300:
            raise urllib.error.HTTPError(request.url, response.status, response.reason, response.msg, io.BytesIO(body))
    finally:
        connection.close()


def condition(status: str, reason: str, message: str) -> Manifest:
    return {
        "type": WARMED_UP_CONDITION,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


@dataclass
class WarmUps:
    """Runs warm-ups in the background, at most one per pod at a time, with a growing delay after failures."""

    set_condition: Callable[[str, str, Manifest], Any]  # (namespace, pod name, condition)
    timeout_seconds: float
    workers: int = 4
    sender: Callable[[WarmUpRequest, float], None] = send
    clock: Callable[[], float] = time.monotonic
    _executor: ThreadPoolExecutor | None = None
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _running: set[str] = field(default_factory=set)
    # pod UID -> (earliest next attempt, delay after the next failure)
    _backoff: dict[str, tuple[float, float]] = field(default_factory=dict)

    def ensure(self, pods: list[Manifest], runtime: str, port: int) -> int:
        """Start a warm-up for every pod of one model that needs one; returns how many were started."""
        started = 0
        self._prune()
        for pod in pods:
            request = warmup_request(pod, runtime, port)
            if request is None:
                continue
            with self._guard:
                not_before, _ = self._backoff.get(request.uid, (0.0, FIRST_RETRY_SECONDS))
                if request.uid in self._running or self.clock() < not_before:
                    continue
                self._running.add(request.uid)
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="warmup")
                executor = self._executor
            executor.submit(self._warm_up, request)
            started += 1
        return started

    def _prune(self) -> None:
        """Forget the retry state of pods not retried for a long time (most are gone): bounded memory."""
        with self._guard:
            stale = self.clock() - 2 * MAX_RETRY_SECONDS
            for uid in [uid for uid, (not_before, _) in self._backoff.items() if not_before < stale]:
                if uid not in self._running:
                    del self._backoff[uid]

    def shutdown(self) -> None:
        with self._guard:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _warm_up(self, request: WarmUpRequest) -> None:
        started = self.clock()
        try:
            try:
                self.sender(request, self.timeout_seconds)
            except Exception as exc:
                error = engine_error(exc)
                with self._guard:
                    _, delay = self._backoff.get(request.uid, (0.0, FIRST_RETRY_SECONDS))
                    self._backoff[request.uid] = (self.clock() + delay, min(delay * 2, MAX_RETRY_SECONDS))
                logger.warning("warm-up of %s/%s failed: %s", request.namespace, request.pod, error)
                message = f"the warm-up generation failed: {error}; retrying in {delay:.0f}s"
                self._set(request, condition("False", Reason.WARM_UP_FAILED, message))
                return
            seconds = self.clock() - started
            with self._guard:
                self._backoff.pop(request.uid, None)
            logger.info("%s/%s answered its warm-up in %.1fs", request.namespace, request.pod, seconds)
            message = f"answered a 1-token warm-up generation in {seconds:.1f}s"
            self._set(request, condition("True", Reason.WARMED_UP, message))
        finally:
            with self._guard:
                self._running.discard(request.uid)

    def _set(self, request: WarmUpRequest, value: Manifest) -> None:
        try:
            self.set_condition(request.namespace, request.pod, value)
        except Exception as exc:
            logger.info("could not set %s on %s/%s: %s", WARMED_UP_CONDITION, request.namespace, request.pod, exc)
