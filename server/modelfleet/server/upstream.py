"""The router's HTTP/1.1 client for model servers: keep-alive connections, streamed bodies, and the
three failures the router tells apart.

Why not aiohttp (used before): its client spends more CPU per request than the rest of the router's
hot path together (a request object, a response object, a StreamReader, a timer context, cookie
and redirect handling, each per request). The router needs a small part of HTTP: POST or GET one
origin, a JSON body out, a JSON or line-streamed body back, no cookies, no redirects, no
compression. This client is that part, on asyncio's Protocol with llhttp (through httptools, the
parser uvicorn already brings) doing the parsing. docs/benchmarks.md has the before and after.

Failures:
- UpstreamUnreachable: no connection was made, so nothing was sent; another replica may be tried.
- UpstreamTimeout: the server stayed silent longer than the read timeout.
- UpstreamBroken: the connection closed or sent something that is not HTTP, mid-response.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import httptools


class UpstreamError(Exception):
    """A backend could not be reached, timed out, or broke the connection."""


class UpstreamUnreachable(UpstreamError):
    """No connection: refused, unresolvable, or not accepted within the connect timeout."""


class UpstreamTimeout(UpstreamError):
    """Connected, but the server sent nothing for longer than the read timeout."""


class UpstreamBroken(UpstreamError):
    """The connection closed early, or the server's bytes were not a valid HTTP response."""


# A streamed body waiting for a slow reader stops the socket's reads past this many bytes, so one
# slow client cannot make the router hold a whole generation in memory.
BUFFER_HIGH_WATER = 256 * 1024

Origin = tuple[str, str, int]  # scheme, host, port


class UpstreamResponse:
    """Status and headers are here once `request` returns; the body arrives as it comes.

    Read it whole with `read()` or piece by piece with `async for`; `close()` before the end closes the
    connection, which is how a backend learns to stop generating. A fully read response has already
    given its connection back to the pool."""

    __slots__ = ("_buffered", "_connection", "_done", "_error", "_pieces", "_waiter", "headers", "reason", "status")

    def __init__(self, connection: _Connection, status: int, reason: str, headers: dict[str, str]) -> None:
        self._connection: _Connection | None = connection
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.status = status
        self.reason = reason
        self.headers = headers  # names lower-cased

    # Called by the connection.
    def _feed(self, data: bytes) -> None:
        self._pieces.append(data)
        self._buffered += len(data)
        if self._buffered > BUFFER_HIGH_WATER and self._connection is not None:
            self._connection.pause()
        self._wake()

    def _finish(self, error: UpstreamError | None = None) -> None:
        self._done = True
        self._error = error
        self._connection = None
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _next(self) -> bytes | None:
        """The next piece of the body, or None at its end."""
        while not self._pieces:
            if self._done:
                if self._error is not None:
                    raise self._error
                return None
            connection = self._connection
            assert connection is not None
            self._waiter = waiter = connection.loop.create_future()
            connection.watch(waiter)
            try:
                await waiter
            finally:
                connection.watched = None
                self._waiter = None
        piece = self._pieces.popleft()
        self._buffered -= len(piece)
        if self._connection is not None and self._buffered <= BUFFER_HIGH_WATER // 2:
            self._connection.resume()
        return piece

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while (piece := await self._next()) is not None:
            yield piece

    async def read(self) -> bytes:
        pieces = []
        while (piece := await self._next()) is not None:
            pieces.append(piece)
        return b"".join(pieces)

    def close(self) -> None:
        """Stop reading; an unfinished body closes its connection."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abandon()
        self._done = True
        self._pieces.clear()


class _Connection(asyncio.Protocol):
    """One socket to one origin, carrying one request at a time; llhttp's callbacks land here."""

    def __init__(self, client: UpstreamClient, origin: Origin) -> None:
        self.client = client
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.read_timeout = client.read_timeout
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        # The read timeout: one timer per connection, re-armed only when it fires, against the time
        # of the last byte (or of the request, or of resumed reading). A timer per wait cost more
        # than the rest of a streamed chunk's bookkeeping (uvloop starts a libuv timer for each).
        self.activity = 0.0
        self.watched: asyncio.Future[Any] | None = None  # failed with UpstreamTimeout on silence
        self.silence_timer: asyncio.TimerHandle | None = None
        # The request in flight: first its headers, then its body.
        self.head: asyncio.Future[UpstreamResponse] | None = None
        self.response: UpstreamResponse | None = None
        self.reason = b""
        self.header_pairs: list[tuple[bytes, bytes]] = []
        self.body_until_close = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.activity = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(UpstreamBroken(f"the backend's response is not valid HTTP: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_watching()
        if self.response is not None and self.body_until_close and exc is None:
            response, self.response = self.response, None
            response._finish()
        else:
            self.fail(UpstreamBroken("the backend closed the connection" + (f": {exc}" if exc else "")))

    # llhttp callbacks
    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_pairs.append((name, value))

    def on_headers_complete(self) -> None:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in self.header_pairs}
        self.body_until_close = "content-length" not in headers and "chunked" not in headers.get(
            "transfer-encoding", ""
        )
        status = self.parser.get_status_code()
        self.response = UpstreamResponse(self, status, self.reason.decode("latin-1"), headers)
        if self.head is not None and not self.head.done():
            self.head.set_result(self.response)
        self.head = None

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        response, self.response = self.response, None
        reusable = self.parser.should_keep_alive() and not self.closed
        if response is not None:
            response._finish()
        self.resume()
        if reusable:
            self.client._release(self)
        else:
            self.close()

    # The client's side
    def send(self, message: bytes) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        self.reason = b""
        self.header_pairs = []
        self.body_until_close = False
        self.head = self.loop.create_future()
        self.activity = self.loop.time()
        self.transport.write(message)
        return self.head

    def watch(self, waiter: asyncio.Future[Any]) -> None:
        """Fail `waiter` with UpstreamTimeout once the server has been silent for the read timeout."""
        self.watched = waiter
        if self.silence_timer is None:
            self.silence_timer = self.loop.call_at(self.activity + self.read_timeout, self._check_silence)

    def _stop_watching(self) -> None:
        if self.silence_timer is not None:
            self.silence_timer.cancel()
            self.silence_timer = None

    def _check_silence(self) -> None:
        self.silence_timer = None
        waiter = self.watched
        if waiter is None or waiter.done():
            return  # nobody waits; the next wait arms the timer again
        silent_until = self.activity + self.read_timeout
        if self.loop.time() >= silent_until:
            waiter.set_exception(UpstreamTimeout("the backend sent nothing within the read timeout"))
        else:
            self.silence_timer = self.loop.call_at(silent_until, self._check_silence)

    def fail(self, error: UpstreamError) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        self.head = None
        response, self.response = self.response, None
        if response is not None:
            response._finish(error)

    def abandon(self) -> None:
        """The reader stopped before the end: this connection's next bytes belong to nothing."""
        self.response = None
        self.close()

    def close(self) -> None:
        self.closed = True
        self._stop_watching()
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.activity = self.loop.time()  # the server could not send while we did not read
            self.transport.resume_reading()


class UpstreamClient:
    """Keep-alive connections per origin, without a limit (the router's queue decides concurrency).

    `read_timeout` is the longest silence allowed while waiting for headers or body; there is no
    overall deadline, since a generation may stream for minutes."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, idle_seconds: float = 30.0) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_seconds = idle_seconds
        # Most recently used last: reuse takes from the right, expiry trims from the left.
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None = None
    ) -> UpstreamResponse:
        """Send the request; return once the response's headers arrived."""
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamUnreachable(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        origin = (scheme, parts.hostname, port)
        target = parts.path or "/"
        if parts.query:
            target = f"{target}?{parts.query}"
        lines = [f"{method} {target} HTTP/1.1\r\nhost: {parts.netloc}\r\n"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name} has a line break")
            lines.append(f"{name}: {value}\r\n")
        if body is not None:
            lines.append(f"content-length: {len(body)}\r\n")
        lines.append("\r\n")
        message = "".join(lines).encode("latin-1")
        if body:
            message += body
        connection = self._reuse(origin) or await self._connect(origin)
        head = connection.send(message)
        connection.watch(head)
        try:
            return await head
        except BaseException:
            # Cancelled or failed before the headers: the connection's state is unknown.
            connection.abandon()
            raise
        finally:
            connection.watched = None

    async def fetch(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None = None,
        deadline: float | None = None,
    ) -> tuple[int, str, bytes]:  # fmt: skip
        """Status, reason and the whole body; `deadline` (seconds) bounds the whole exchange."""
        try:
            async with asyncio.timeout(deadline):
                response = await self.request(method, url, headers, body)
                try:
                    return response.status, response.reason, await response.read()
                finally:
                    response.close()
        except TimeoutError as exc:
            raise UpstreamTimeout(f"no complete answer within {deadline} s") from exc

    def _reuse(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.closed or connection.transport is None or connection.transport.is_closing():
                continue
            if now - connection.idle_since > self.idle_seconds:
                connection.close()
                continue
            return connection
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(lambda: _Connection(self, origin), host, port,
                                                             ssl=context)  # fmt: skip
        except TimeoutError as exc:
            raise UpstreamUnreachable(f"no connection to {host}:{port} within {self.connect_timeout} s") from exc
        except OSError as exc:  # refused, unresolvable, TLS failure
            raise UpstreamUnreachable(f"no connection to {host}:{port}: {exc}") from exc
        return connection

    def _release(self, connection: _Connection) -> None:
        connection.idle_since = now = time.monotonic()
        idle = self._idle.setdefault(connection.origin, deque())
        idle.append(connection)
        # A burst leaves many connections behind; those unused for idle_seconds are closed here, as
        # reuse only ever takes the most recent ones.
        while idle and now - idle[0].idle_since > self.idle_seconds:
            idle.popleft().close()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
