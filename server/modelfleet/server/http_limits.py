"""What one HTTP connection may cost the router before its request has been read.

uvicorn's httptools protocol has no limit on a request's header bytes and no deadline for them: a
header that never ends is buffered without bound (each byte kept by llhttp's callbacks), and a
connection that never sends a byte, or sends one a second, stays open for ever (uvicorn's keep-alive
timer starts only after a first response). `limited_protocol` is that protocol with three limits, as
nginx (`large_client_header_buffers`, `client_header_timeout`, `worker_connections`) and Envoy
(`max_request_headers_kb`, `request_headers_timeout`, `max_connections`) have them:

1. **Header bytes.** A request's line and headers may be `max_header_bytes` long. Past that the
   router answers 431 (the one error format, `Connection: close`) and closes the connection; the
   parser is never fed the excess. Counted are the bytes fed to the parser from the start of a
   request until its headers are complete, never its body, even when the body comes in the same read.
   One approximation: a request that starts inside the read in which the previous one ended
   (pipelining) is counted, for that read, from what the parser delivered (its URL and complete header
   lines), so at most one read (uvloop reads 256 KB at most) is not counted exactly.
2. **Header deadline.** A request's headers must be complete `header_timeout_seconds` after the
   connection opened (its first request) or after the first byte of a later request. Otherwise the
   router answers 408 and closes (or just closes, when no byte came: an idle connection). While an
   earlier response on the connection is still being sent, it is finished first, then the connection
   closes. One timer per connection state change: armed when a connection opens or a request's first
   read leaves its headers incomplete, cancelled when they are complete; none per read.
3. **Connections.** A process keeps at most `max_connections` open. One more is accepted and closed at
   once (no response): a 503 (uvicorn's `limit_concurrency`) could only be sent after reading the
   request, which is the very cost the cap bounds (an attacker's slow headers), and uvicorn's limit
   also counts in-flight requests, which admission (per-model caps and queues, 429) already governs.
   A closed connection is what a balancer or client retries elsewhere, as with Envoy's overflow.

Bytes that are not HTTP/1.1 (the parser refuses them) get 400 in the same error format, then a close.

Each worker process (MODELFLEET_WORKERS) builds its own server in `__main__.main`, so each applies the
limits to its own connections: the cap is per process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from modelfleet.server.errors import error_body

logger = logging.getLogger("modelfleet.server.http_limits")

# 64 KiB: nginx's default allows 4 buffers of 8 KiB (32 KiB) and Envoy 60 KiB; API keys, cookies and
# tracing headers of real clients take a few KiB. 2,048 connections x 64 KiB stay well inside the pod's 1 GiB.
DEFAULT_MAX_HEADER_BYTES = 65_536
# 10 s: a real client sends its headers in one write, within a round trip; even a slow mobile link or a
# busy client finishes in well under a second. An idle or slowloris connection then holds a slot for 10 s
# at most, so keeping a process's 2,048 slots full takes ~200 new connections a second, which
# is visible and rate-limitable at the edge. (nginx's default is 60 s; shorter is safe behind a balancer,
# which forwards a request's headers at once.)
DEFAULT_HEADER_TIMEOUT_SECONDS = 10.0
# 2,048: uvicorn's listen backlog and nginx's usual worker_connections; well above what one process
# serves (about 2,500 requests a second, on keep-alive connections), and within the default file limit
# of a container (1,048,576) with room for the upstream connections each request also opens.
DEFAULT_MAX_CONNECTIONS = 2048

# Refusals are logged at most this often, with counts: an attack must not flood the log.
LOG_INTERVAL_SECONDS = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    header_timeout_seconds: float = DEFAULT_HEADER_TIMEOUT_SECONDS
    max_connections: int = DEFAULT_MAX_CONNECTIONS


class RefusalLog:
    """Counts of refused connections and requests, logged as one line per interval at most."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.logged_at = 0.0

    def note(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
        now = time.monotonic()
        if now - self.logged_at >= LOG_INTERVAL_SECONDS:
            summary = ", ".join(f"{count} {name}" for name, count in sorted(self.counts.items()))
            logger.warning("refused by the connection limits since the last report: %s", summary)
            self.counts.clear()
            self.logged_at = now


MESSAGES = {
    400: ("The request is not valid HTTP/1.1.", "invalid_http_request"),
    408: ("The request's headers did not arrive in time.", "request_timeout"),
    431: ("The request's line and headers are larger than the router accepts.", "request_header_fields_too_large"),
}


def error_bytes(status: int, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A complete `Connection: close` response in the router's one error format."""
    message, code = MESSAGES[status]
    body = orjson.dumps(error_body(message, "invalid_request_error", code))
    lines = [STATUS_LINE[status]]
    lines += [name + b": " + value + b"\r\n" for name, value in default_headers]
    lines += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body), b"connection: close\r\n"]
    return b"".join([*lines, b"\r\n", body])


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a cap on connections, header bytes and header time."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    # One per server, shared by its connections: limited_protocol makes the class of each server.
    refusals: ClassVar[RefusalLog]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # Bytes fed to the parser for the request being read, until its headers are complete.
        self.header_bytes = 0
        self.reading_headers = False  # a request has begun and its headers are not complete
        self.in_body = False  # the headers are complete and the body is not
        self.header_timer: asyncio.TimerHandle | None = None
        self.refused = False  # over the connection cap: closed without being served
        self.given_up = False  # 431 or 408: nothing more is read

    # Connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.refused = True
            self.transport = transport
            transport.close()
            self.refusals.note("connections over MODELFLEET_MAX_CONNECTIONS")
            return
        super().connection_made(transport)
        self.header_timer = self.loop.call_later(self.limits.header_timeout_seconds, self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_header_timer()
        if self.refused:
            return
        super().connection_lost(exc)

    # Reading

    def data_received(self, data: bytes) -> None:
        if self.given_up:
            return
        if self.in_body:
            super().data_received(data)
        elif len(data) > self.limits.max_header_bytes - self.header_bytes:
            self.feed_in_parts(data)
            return
        else:
            self.header_bytes += len(data)
            super().data_received(data)
        if self.reading_headers or self.header_bytes:
            self.headers_pending()

    def feed_in_parts(self, data: bytes) -> None:
        """Feed a read that may hold more header bytes than are left: the headers' share, then the rest."""
        view = memoryview(data)
        start = 0
        while start < len(view) and not self.given_up and not self.transport.is_closing():
            if self.in_body:
                end = len(view)
            else:
                room = self.limits.max_header_bytes - self.header_bytes
                if room <= 0:
                    self.give_up(431)
                    return
                end = min(len(view), start + room)
                self.header_bytes += end - start
            super().data_received(view[start:end])  # type: ignore[arg-type]  # the parser takes any buffer
            start = end
            if self.reading_headers or self.header_bytes:
                self.headers_pending()

    def headers_pending(self) -> None:
        """After a read that left a request's headers incomplete: check what it counts, and its deadline."""
        if self.header_bytes == 0:
            # The request began in this read, after the previous one ended in it: count what the parser
            # delivered of it (a lower bound: its last, incomplete header line is not seen).
            self.header_bytes = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if self.header_bytes > self.limits.max_header_bytes:
                self.give_up(431)
                return
        if self.header_timer is None and not self.transport.is_closing():
            self.header_timer = self.loop.call_later(self.limits.header_timeout_seconds, self.header_timeout)

    # Parser callbacks

    def on_message_begin(self) -> None:
        self.reading_headers = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.reading_headers = False
        self.in_body = True
        self.header_bytes = 0
        self.cancel_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.in_body = False
        super().on_message_complete()

    # Refusals

    def header_timeout(self) -> None:
        self.header_timer = None
        if self.transport.is_closing():
            return
        if self.reading_headers or self.header_bytes:
            self.refusals.note("requests whose headers took longer than MODELFLEET_HEADER_TIMEOUT_SECONDS (408)")
            self.give_up(408)
        else:
            self.give_up(None)  # idle since it opened: nothing to answer

    def give_up(self, status: int | None) -> None:
        """Read nothing more; answer `status` and close, or close once the response in progress is sent."""
        if status == 431:
            self.refusals.note("requests over MODELFLEET_MAX_HEADER_BYTES (431)")
        self.given_up = True
        self.cancel_header_timer()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # An earlier request's response is being sent (this one was pipelined behind it): an answer
            # now would land inside it, so finish it (and any request queued behind it), then close.
            cycle.keep_alive = False
            return
        if status is not None:
            self.transport.write(error_bytes(status, self.server_state.default_headers))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """Bytes the parser refuses (a malformed request line, header or chunk): 400 in the one error
        format, not uvicorn's text/plain, and nothing more is read from the connection."""
        self.given_up = True
        self.cancel_header_timer()
        self.transport.write(error_bytes(400, self.server_state.default_headers))
        self.transport.close()

    def cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None


def limited_protocol(limits: ConnectionLimits) -> type[LimitedHttpToolsProtocol]:
    """The protocol class to pass as `uvicorn.Config(http=...)`, with these limits."""
    return cast(
        type[LimitedHttpToolsProtocol],
        type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits, "refusals": RefusalLog()}),
    )
