"""The router's upstream HTTP client against scripted servers on 127.0.0.1: real sockets, with the
server misbehaving in the ways a model server or the network can (silence, a close mid-body,
bytes that are not HTTP), which a real Ollama will not do on demand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import uvloop

from modelfleet.server.upstream import (
    BUFFER_HIGH_WATER,
    UpstreamBroken,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
    _Connection,
)
from tests.support.procs import free_port

pytestmark = pytest.mark.unit

# Long enough that a busy machine's stalls stay well below it, short enough to wait out in a test.
READ_TIMEOUT = 0.5
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
JSON_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"


class Scripted:
    """A server that runs `handler` on each connection and counts the connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed_by_client = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[tuple[Scripted, str]]:
    server_state = Scripted(handler)
    server = await asyncio.start_server(server_state.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield server_state, f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The request's head and body (by content-length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


Runner = Callable[[Awaitable[None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Each scenario on both event loops: the router runs on uvloop, whose transports differ."""
    loop_run = asyncio.run if request.param == "asyncio" else uvloop.run

    def runner(scenario: Awaitable[None]) -> None:
        async def bounded() -> None:
            await asyncio.wait_for(scenario, 60)

        loop_run(bounded())

    return runner


def client(read_timeout: float = 30.0) -> UpstreamClient:
    return UpstreamClient(connect_timeout=5.0, read_timeout=read_timeout)


def test_answers_are_read_whole_and_the_connection_is_kept_for_the_next_request(run: Runner) -> None:
    requests: list[tuple[bytes, bytes]] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            requests.append(await read_request(reader))
            body = b'{"n": %d}' % len(requests)
            writer.write(JSON_HEAD + b"content-length: %d\r\n\r\n" % len(body) + body)

    async def scenario() -> None:
        async with scripted(echo) as (server, url):
            http = client()
            first = await http.fetch("POST", f"{url}/v1/chat/completions?x=1", {"authorization": "Bearer k"}, b"{}")
            second = await http.fetch("POST", f"{url}/v1/completions", {}, b'{"a": 1}')
            await http.aclose()
        assert first == (200, "OK", b'{"n": 1}')
        assert second[2] == b'{"n": 2}'
        assert server.connections == 1
        head, body = requests[0]
        assert head.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
        assert b"authorization: Bearer k\r\n" in head
        assert b"content-length: 2\r\n" in head
        assert body == b"{}"
        assert requests[1][1] == b'{"a": 1}'

    run(scenario())


def test_a_streamed_body_arrives_piece_by_piece_before_it_ends(run: Runner) -> None:
    first_seen = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nline1\n\r\n")
        await first_seen.wait()  # the rest only once the client has the first piece
        writer.write(b"6\r\nline2\n\r\n0\r\n\r\n")

    async def scenario() -> None:
        async with scripted(stream) as (_, url):
            http = client()
            response = await http.request("POST", f"{url}/api/chat", {}, b"{}")
            pieces = []
            async for piece in response:
                pieces.append(piece)
                first_seen.set()
            await http.aclose()
        assert pieces == [b"line1\n", b"line2\n"]

    run(scenario())


def test_a_port_with_no_listener_is_unreachable(run: Runner) -> None:
    async def scenario() -> None:
        with pytest.raises(UpstreamUnreachable):
            await client().request("POST", f"http://127.0.0.1:{free_port()}/v1/completions", {}, b"{}")

    run(scenario())


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    await reader.read()  # never answers; returns when the client gives up


async def headers_then_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    await reader.read()


async def cut_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(JSON_HEAD + b'content-length: 100\r\n\r\n{"partial')
    await writer.drain()


async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    await reader.read()


@pytest.mark.parametrize(
    ("handler", "failure", "stage"),
    [
        (silent, UpstreamTimeout, "headers"),
        (headers_then_silent, UpstreamTimeout, "body"),
        (cut_mid_body, UpstreamBroken, "body"),
        (not_http, UpstreamBroken, "headers"),
    ],
)
def test_silence_a_close_mid_body_and_bytes_that_are_not_http_fail_as_what_they_are(
    run: Runner, handler: Handler, failure: type[Exception], stage: str
) -> None:
    async def scenario() -> None:
        async with scripted(handler) as (_, url):
            http = client(read_timeout=0.2)
            if stage == "headers":
                with pytest.raises(failure):
                    await http.request("POST", url, {}, b"{}")
            else:
                response = await http.request("POST", url, {}, b"{}")
                with pytest.raises(failure):
                    await response.read()

    run(scenario())


def test_a_body_that_keeps_coming_is_never_cut_however_long_it_lasts(run: Runner) -> None:
    """The read timeout bounds each silence, not the stream: a line every fifth of the timeout, for
    four timeouts, arrives whole."""
    lines = 20

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(lines):
            writer.write(b"4\r\n%03d\n\r\n" % i)
            await writer.drain()
            await asyncio.sleep(READ_TIMEOUT / 5)
        writer.write(b"0\r\n\r\n")

    async def scenario() -> None:
        async with scripted(trickle) as (_, url):
            response = await client(read_timeout=READ_TIMEOUT).request("POST", url, {}, b"{}")
            assert await response.read() == b"".join(b"%03d\n" % i for i in range(lines))

    run(scenario())


def test_closing_an_unfinished_response_closes_its_connection_so_the_backend_stops(run: Runner) -> None:
    state: dict[str, Scripted] = {}

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\ntoken\n\r\n")
        await reader.read()  # EOF: the client closed the connection
        state["server"].closed_by_client.set()

    async def scenario() -> None:
        async with scripted(endless) as (server, url):
            state["server"] = server
            http = client()
            response = await http.request("POST", url, {}, b"{}")
            async for _ in response:
                break
            response.close()
            await server.closed_by_client.wait()
            # The closed connection is not offered again: the next request opens a new one.
            await http.request("POST", url, {}, b"{}")
            assert server.connections == 2
            await http.aclose()

    run(scenario())


class Clock:
    """The client's clock, moved by the test: an idle limit is tens of seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def test_connections_a_burst_left_idle_are_closed_once_past_the_idle_limit(
    run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr("modelfleet.server.upstream.time", clock)
    opened, closed = [0], [0]
    burst_arrived, two_closed = asyncio.Event(), asyncio.Event()

    async def answer_until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened[0] += 1
        if opened[0] == 3:
            burst_arrived.set()
        try:
            while True:
                await read_request(reader)
                await burst_arrived.wait()  # the burst's three requests are answered together
                writer.write(JSON_HEAD + b"content-length: 2\r\n\r\n{}")
        finally:
            closed[0] += 1
            if closed[0] == 2:
                two_closed.set()

    async def scenario() -> None:
        async with scripted(answer_until_closed) as (server, url):
            http = UpstreamClient(connect_timeout=5.0, read_timeout=30.0, idle_seconds=5.0)
            await asyncio.gather(*(http.fetch("GET", url, {}) for _ in range(3)))  # three connections, idle since 0
            clock.now = 3.0
            await http.fetch("GET", url, {})  # reuses the most recent one
            clock.now = 6.0
            await http.fetch("GET", url, {})  # again; the two others have now been idle for 6 s
            await two_closed.wait()
            assert server.connections == 3
            assert closed[0] == 2  # the one in use stays
            await http.aclose()

    run(scenario())


def test_connection_close_and_bodies_delimited_by_the_close_are_honoured(run: Runner) -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    async def scenario() -> None:
        async with scripted(until_close) as (server, url):
            http = client()
            assert (await http.fetch("GET", url, {}))[2] == b"all of it"
            assert (await http.fetch("GET", url, {}))[2] == b"all of it"
            assert server.connections == 2

    run(scenario())


async def unread_until_paused(url: str, resumed: asyncio.Event) -> tuple[UpstreamResponse, _Connection]:
    """A GET whose body nobody reads until the client has stopped reading the socket; `resumed` is set
    once the client reads it again."""
    response = await client(read_timeout=READ_TIMEOUT).request("GET", url, {})
    connection = response._connection
    assert connection is not None
    paused = asyncio.Event()
    pause, resume = connection.pause, connection.resume

    def pause_and_tell() -> None:
        pause()
        paused.set()

    def resume_and_tell() -> None:
        if connection.paused:
            resumed.set()
        resume()

    connection.pause = pause_and_tell  # type: ignore[method-assign]
    connection.resume = resume_and_tell  # type: ignore[method-assign]
    await paused.wait()
    return response, connection


def test_a_reader_slower_than_the_backend_pauses_the_socket_and_loses_nothing(run: Runner) -> None:
    size = 4 * BUFFER_HIGH_WATER
    line = b"x" * 1023 + b"\n"

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(JSON_HEAD + b"content-length: %d\r\n\r\n" % size)
        for _ in range(size // len(line)):
            writer.write(line)
            await writer.drain()

    async def scenario() -> None:
        async with scripted(flood) as (_, url):
            response, connection = await unread_until_paused(url, asyncio.Event())
            assert connection.transport is not None
            assert not connection.transport.is_reading()
            # At most one socket read (asyncio's are up to 256 KiB) past the mark.
            assert response._buffered <= BUFFER_HIGH_WATER + 256 * 1024
            assert await response.read() == line * (size // len(line))

    run(scenario())


def test_a_pause_longer_than_the_read_timeout_is_not_the_backends_silence(run: Runner) -> None:
    """The backend sends just past the mark and waits for more reading; the reader takes twice the read
    timeout to come back. From the resume, the backend has a whole read timeout again."""
    line = b"x" * 1023 + b"\n"
    lines = BUFFER_HIGH_WATER // len(line) + 1
    resumed = asyncio.Event()

    async def past_the_mark_then_wait(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(JSON_HEAD + b"content-length: %d\r\n\r\n" % ((lines + 1) * len(line)))
        for _ in range(lines):
            writer.write(line)
            await writer.drain()
        await resumed.wait()
        await asyncio.sleep(READ_TIMEOUT / 2)
        writer.write(line)

    async def scenario() -> None:
        async with scripted(past_the_mark_then_wait) as (_, url):
            response, _ = await unread_until_paused(url, resumed)
            await asyncio.sleep(2 * READ_TIMEOUT)  # the reader is away
            assert await response.read() == line * (lines + 1)

    run(scenario())


def test_a_header_value_with_a_line_break_is_refused_before_anything_is_sent(run: Runner) -> None:
    async def scenario() -> None:
        with pytest.raises(ValueError, match="line break"):
            await client().request("GET", "http://127.0.0.1:1/", {"x-model": "a\r\nx-admin: 1"})

    run(scenario())
