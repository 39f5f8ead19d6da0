"""Per-model admission: up to `max_in_flight` requests run, then a bounded FIFO queue, then 429.

The queue depth is the HPA's signal (modelfleet_queue_depth), so it counts exactly the requests
that wait for a slot.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from modelfleet.server.errors import RouterError
from modelfleet.server.metrics import RouterMetrics


class ModelQueue:
    def __init__(self, model: str, max_in_flight: int, max_queue: int, metrics: RouterMetrics) -> None:
        self.model = model
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.metrics = metrics
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._recent_durations: deque[float] = deque(maxlen=32)

    @property
    def depth(self) -> int:
        return len(self._waiters)

    def retry_after_seconds(self) -> int:
        """A hint for clients: how long the queue ahead would take to drain, from recent durations."""
        typical = sorted(self._recent_durations)[len(self._recent_durations) // 2] if self._recent_durations else 1.0
        waves = (self.depth + self.in_flight) / max(1, self.max_in_flight)
        return max(1, math.ceil(typical * waves))

    def _publish(self) -> None:
        self.metrics.queue_depth.labels(model=self.model).set(self.depth)
        self.metrics.in_flight.labels(model=self.model).set(self.in_flight)

    @asynccontextmanager
    async def slot(self, max_wait_seconds: float) -> AsyncIterator[None]:
        """Hold one of the model's slots for the block; wait in line for at most `max_wait_seconds`."""
        queued_at = time.monotonic()
        if self.in_flight < self.max_in_flight and not self._waiters:
            self.in_flight += 1
        elif self.depth >= self.max_queue:
            self.metrics.rejected.labels(model=self.model, reason="queue_full").inc()
            raise RouterError(
                429,
                f"Too many requests are waiting for `{self.model}`; retry later.",
                type="rate_limit_error",
                code="queue_full",
                headers={"retry-after": str(self.retry_after_seconds())},
            )
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self._publish()
            try:
                await asyncio.wait_for(asyncio.shield(waiter), max_wait_seconds)
            except (TimeoutError, asyncio.CancelledError) as exc:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # the slot was handed over just as we gave up: pass it on
                else:
                    waiter.cancel()
                    self._waiters.remove(waiter)
                self._publish()
                if isinstance(exc, TimeoutError):
                    self.metrics.rejected.labels(model=self.model, reason="queue_timeout").inc()
                    raise RouterError(504, f"Waited {max_wait_seconds:.0f}s for `{self.model}` without a free slot.",
                                      type="timeout_error", code="queue_timeout") from None  # fmt: skip
                raise
        self.metrics.queue_wait.labels(model=self.model).observe(time.monotonic() - queued_at)
        self._publish()
        started = time.monotonic()
        try:
            yield
        finally:
            self._recent_durations.append(time.monotonic() - started)
            self._release()
            self._publish()

    def _release(self) -> None:
        """Hand the slot to the first waiter still waiting, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return  # in_flight stays the same: the slot changes hands
        self.in_flight -= 1
