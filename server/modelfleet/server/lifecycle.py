"""Graceful shutdown: drain first, then stop accepting, then let in-flight streams finish.

A Kubernetes pod gets SIGTERM at the same moment its endpoint starts being removed from every
load balancer; until they have all caught up (a few seconds) new requests keep arriving.  Closing
the listener at once (uvicorn's default) would refuse them.  So the router drains:

1. SIGTERM: /readyz answers 503 and every response carries `Connection: close`, so balancers and
   keep-alive clients move to other replicas, while requests that still arrive are served.
2. After `drain_seconds`: uvicorn's own shutdown.  The listener closes (new connections are
   refused at the TCP level, which proxies retry elsewhere), idle connections close, and in-flight
   requests and streams get `grace_seconds` to finish before they are cancelled.

A second SIGTERM or SIGINT skips the rest of the drain.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass
class Drain:
    """Whether the process is draining, shared by the server (which starts it) and the app (which reports it)."""

    seconds: float
    started_at: float | None = None

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def begin(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()

    def over(self) -> bool:
        return self.started_at is not None and time.monotonic() - self.started_at >= self.seconds


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with a drain period between the first signal and its shutdown."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler: only set flags; on_tick acts on them within 0.1 s.
        if self.drain.draining or self.drain.seconds <= 0 or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # uvicorn re-raises these after shutdown, for the exit status
        self.drain.begin()
        name = signal.Signals(sig).name
        uvicorn.server.logger.info(
            "%s: draining for %.1fs (readiness fails) before shutting down", name, self.drain.seconds
        )

    async def on_tick(self, counter: int) -> bool:
        if self.drain.over():
            self.should_exit = True
        return await super().on_tick(counter)


class CloseWhenDraining:
    """ASGI middleware: while draining, ask each client to close its connection after the response."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.drain.draining:
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)
