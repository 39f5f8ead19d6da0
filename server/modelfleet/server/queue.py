"""Per-model admission: up to `capacity` requests run, then a bounded fair queue, then 429.

Capacity is maxInFlightPerReplica x ready replicas, and follows discovery: with zero ready
replicas requests wait (up to their deadline) instead of failing, and they start as soon as a
replica appears; an unloaded model, which nothing will bring a replica, refuses them at once.  The
queue depth is the HPA's signal (modelfleet_queue_depth), so it counts exactly the requests that
wait for a slot.

The queue is fair across callers: within a priority band (interactive before batch), waiting
requests start in the order of start-time fair queueing, where each caller's requests are spaced by
1 / its weight in virtual time.  A caller that floods gets its weight's share of the slots, and a
caller with nothing waiting starts next, not after the flood.  With one caller, it is FIFO.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from modelfleet.server.errors import MODEL_NOT_FOUND, QUEUE_DEADLINE, QUEUE_FULL, QUEUE_TIMEOUT, RouterError
from modelfleet.server.metrics import RouterMetrics

Priority = Literal["interactive", "batch"]
BANDS: dict[Priority, int] = {"interactive": 0, "batch": 1}


@dataclass(frozen=True)
class Claim:
    """Who a request is for, in the queue's terms: its caller, the caller's weight, its priority band."""

    subject: str = ""
    weight: float = 1.0
    priority: Priority = "interactive"


ANYONE = Claim()


@dataclass(order=True)
class _Waiting:
    band: int
    tag: float  # virtual start time
    sequence: int
    waiter: asyncio.Future[None]


class Ticket:
    """One request's place: granted (it holds a slot) or waiting in line."""

    def __init__(self, queue: ModelQueue, waiter: asyncio.Future[None] | None) -> None:
        self.queue = queue
        self.waiter = waiter
        self.created = time.monotonic()
        self.released = False

    @property
    def granted(self) -> bool:
        waiter = self.waiter
        return waiter is None or (waiter.done() and not waiter.cancelled() and waiter.exception() is None)

    async def wait(self, max_wait_seconds: float) -> float:
        """Wait for the slot; returns the seconds spent in line.  Gives up with 504 after the deadline."""
        if self.waiter is not None and not self.granted:
            try:
                await asyncio.wait_for(asyncio.shield(self.waiter), max(0.0, max_wait_seconds))
            except (TimeoutError, asyncio.CancelledError) as exc:
                self.queue.abandon(self)
                if isinstance(exc, TimeoutError):
                    self.queue.metrics.child(self.queue.metrics.rejected, self.queue.model, "queue_timeout").inc()
                    raise QUEUE_TIMEOUT(f"Waited {max_wait_seconds:.0f}s for `{self.queue.model}` without a free "
                                        "slot.") from None  # fmt: skip
                raise
        waited = time.monotonic() - self.created
        metrics = self.queue.metrics
        metrics.child(metrics.queue_wait, self.queue.model).observe(waited)
        self.queue.started()
        return waited

    def release(self) -> None:
        """Give the slot back (or leave the line); safe to call more than once."""
        if self.released:
            return
        self.released = True
        if self.granted:
            self.queue.finished(time.monotonic() - self.created)
        else:
            self.queue.abandon(self)


class ModelQueue:
    def __init__(
        self, model: str, capacity: int, max_queue: int, metrics: RouterMetrics, namespace: str = "", fair: bool = True
    ) -> None:
        self.fair = fair  # False: one FIFO line for everybody, whatever the key or priority
        self.model = model
        self.namespace = namespace
        self.capacity = capacity
        self.max_queue = max_queue
        self.metrics = metrics
        self.in_flight = 0
        # While set, every request fails with a copy of it at once: the model is gone, or unloaded.
        self.refusal: RouterError | None = None
        self._line: list[_Waiting] = []  # a heap; entries of requests that left are skipped when popped
        self._waiting = 0
        self._virtual_time = 0.0
        self._last_finish: dict[str, float] = {}  # each waiting caller's latest virtual finish time
        self._order = itertools.count()  # arrival order: ties, and the FIFO policy
        self._recent_durations: deque[float] = deque(maxlen=32)
        self._publish()

    @property
    def depth(self) -> int:
        return self._waiting

    def retry_after_seconds(self) -> int:
        """A hint for clients: how long the work ahead would take to drain, from recent durations."""
        typical = sorted(self._recent_durations)[len(self._recent_durations) // 2] if self._recent_durations else 1.0
        waves = (self.depth + self.in_flight) / max(1, self.capacity)
        return max(1, math.ceil(typical * waves))

    def admit(self, claim: Claim = ANYONE, max_wait_seconds: float | None = None) -> Ticket:
        """A slot now, a place in line, or 429 when the line is full or cannot start it within
        `max_wait_seconds` (deadline-aware shedding: better a Retry-After now than a 504 later)."""
        if self.refusal is not None:
            raise self.refusal.fresh()
        if self.in_flight < self.capacity and not self._waiting:
            if self.fair:
                # Served now, so its virtual time is spent: a flood that follows it starts after it.
                self._virtual_time = self._spend(claim, self._fair_start(claim))
            self.in_flight += 1
            self._publish()
            return Ticket(self, None)
        if self.depth >= self.max_queue:
            self.metrics.child(self.metrics.rejected, self.model, "queue_full").inc()
            raise QUEUE_FULL(f"Too many requests are waiting for `{self.model}`; retry later.",
                             headers={"retry-after": str(self.retry_after_seconds())})  # fmt: skip
        order = next(self._order)
        tag, band = (self._fair_start(claim), BANDS[claim.priority]) if self.fair else (float(order), 0)
        expected = self.expected_wait_seconds(band, tag)
        if max_wait_seconds is not None and expected is not None and expected > max_wait_seconds:
            self.metrics.child(self.metrics.rejected, self.model, "queue_deadline").inc()
            raise QUEUE_DEADLINE(f"`{self.model}` is too busy to start this request within {max_wait_seconds:g}s "
                                 f"(about {expected:.0f}s of work is ahead of it); retry later.",
                                 headers={"retry-after": str(self.retry_after_seconds())})  # fmt: skip
        if self.fair:
            self._spend(claim, tag)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._line, _Waiting(band, tag, order, waiter))
        self._waiting += 1
        self._publish()
        return Ticket(self, waiter)

    def _fair_start(self, claim: Claim) -> float:
        """Its virtual start time: now (the start of the request last served) for a caller with nothing
        waiting, which puts it ahead of a flood's next request, else its previous request's finish."""
        return max(self._virtual_time, self._last_finish.get(claim.subject, 0.0))

    def _spend(self, claim: Claim, start: float) -> float:
        """Record the request's virtual finish (start + 1/weight) as its caller's; returns `start`."""
        self._last_finish[claim.subject] = start + 1.0 / max(claim.weight, 1e-6)
        return start

    # Shedding needs a typical duration to go by: not before this many requests have finished.
    SHED_AFTER_SAMPLES = 8

    def expected_wait_seconds(self, band: int, tag: float) -> float | None:
        """How long a request placed at (band, tag) would wait: the waves of requests ahead of it, at the
        median recent duration.  None while that is unknown (too few durations, or no replica at all,
        when requests wait for one to come up rather than for each other)."""
        if self.capacity <= 0 or len(self._recent_durations) < self.SHED_AFTER_SAMPLES:
            return None
        typical = sorted(self._recent_durations)[len(self._recent_durations) // 2]
        ahead = sum(1 for entry in self._line if not entry.waiter.done() and (entry.band, entry.tag) <= (band, tag))
        return (ahead // self.capacity + 1) * typical

    @asynccontextmanager
    async def slot(self, max_wait_seconds: float, claim: Claim = ANYONE) -> AsyncIterator[float]:
        """Hold a slot for the block (yields the seconds spent waiting for it)."""
        ticket = self.admit(claim, max_wait_seconds)
        try:
            yield await ticket.wait(max_wait_seconds)
        finally:
            ticket.release()

    def set_capacity(self, capacity: int) -> None:
        """Follow the ready replicas; a larger capacity starts waiting requests at once."""
        self.capacity = capacity
        self._grant()
        self._publish()

    def close(self, reason: str) -> None:
        """The model is gone: every waiting request fails now rather than at its deadline."""
        self.refuse(MODEL_NOT_FOUND(reason))

    def refuse(self, error: RouterError | None) -> None:
        """Fail every request with `error` from now on, those waiting included; None admits them again."""
        self.refusal = error
        while error is not None and self._line:
            entry = heapq.heappop(self._line)
            if not entry.waiter.done():
                self._waiting -= 1
                entry.waiter.set_exception(error.fresh())
        if error is not None:
            self._last_finish.clear()
        self._publish()

    def started(self) -> None:
        self._publish()

    def finished(self, duration: float) -> None:
        self._recent_durations.append(duration)
        self.in_flight -= 1
        self._grant()
        self._publish()

    def abandon(self, ticket: Ticket) -> None:
        """A waiting request gave up; if its slot was granted just now, pass the slot on."""
        waiter = ticket.waiter
        ticket.released = True
        if waiter is None:
            return
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self.in_flight -= 1
            self._grant()
        elif not waiter.done():
            # Left in the heap, skipped when it comes up: removing it now would cost a search.  When
            # such entries outnumber the waiting ones (callers that give up while no replica is up),
            # the heap is rebuilt, so that it stays bounded by the line.
            waiter.cancel()
            self._waiting -= 1
            if len(self._line) > 2 * self._waiting + 64:
                self._line = [entry for entry in self._line if not entry.waiter.done()]
                heapq.heapify(self._line)
        self._publish()

    def _grant(self) -> None:
        while self._line and self.in_flight < self.capacity:
            entry = heapq.heappop(self._line)
            if entry.waiter.done():
                continue  # it left the line
            self._waiting -= 1
            self._virtual_time = max(self._virtual_time, entry.tag)
            self.in_flight += 1
            entry.waiter.set_result(None)
        if not self._waiting:
            # Nobody waits: virtual time restarts, so that old tags do not weigh on new callers.
            self._line.clear()
            self._last_finish.clear()
            self._virtual_time = 0.0

    def _publish(self) -> None:
        metrics = self.metrics
        metrics.child(metrics.queue_depth, self.model, self.namespace).set(self.depth)
        metrics.child(metrics.in_flight, self.model).set(self.in_flight)
        metrics.child(metrics.slots, self.model).set(self.capacity)
