"""The router's connection limits (http_limits.py): header bytes, the header deadline, the connection cap.

No model server is needed: the static model points at an unused port, and every request here is answered
by the router itself (/livez, or an error before any backend call). Each wait is on an event (a response,
a socket's EOF), bounded by a socket timeout or an overall deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import select
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import RouterServer, running_router
from tests.support.procs import free_port, wait_for
from tests.support.raw_http import (
    Response,
    closed_after,
    connect,
    get_request,
    read_response,
    read_until_eof,
    status_of,
    statuses_of,
)

pytestmark = pytest.mark.integration

SMALL_LIMIT = 4096
MODELS: list[dict[str, object]] = [{"name": "m", "url": f"http://127.0.0.1:{free_port()}"}]
MiB = 1024 * 1024


def port_of(router: RouterServer) -> int:
    return int(router.base_url.rsplit(":", 1)[1])


def answered(sock: socket.socket, status: int) -> Response:
    """The next response on `sock`, which must have `status`."""
    response = read_response(sock)
    assert response is not None, "the router closed the connection instead of answering"
    assert response.status == status, response.body
    return response


def padded_get(total_bytes: int) -> bytes:
    """A GET /livez whose request line and headers are exactly `total_bytes` long."""
    bare = get_request("/livez", ("X-Pad", ""))
    return get_request("/livez", ("X-Pad", "a" * (total_bytes - len(bare))))


@pytest.fixture(scope="module")
def small_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterServer]:
    with running_router(tmp_path_factory.mktemp("small"), MODELS, max_header_bytes=str(SMALL_LIMIT)) as router:
        yield router


@pytest.fixture(scope="module")
def default_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterServer]:
    with running_router(tmp_path_factory.mktemp("default"), MODELS) as router:
        yield router


def test_headers_past_the_limit_get_431_and_the_connection_ends(small_router: RouterServer) -> None:
    port = port_of(small_router)
    with connect(port) as sock:  # exactly at the limit: served, and the connection stays usable
        sock.sendall(padded_get(SMALL_LIMIT))
        answered(sock, 200)
        sock.sendall(get_request())
        answered(sock, 200)
    with connect(port) as sock:  # one byte more: 431 in the one error format, then EOF
        sock.sendall(padded_get(SMALL_LIMIT + 1))
        refused = answered(sock, 431)
        assert refused.headers["connection"] == "close"
        assert json.loads(refused.body)["error"]["code"] == "request_header_fields_too_large"
        assert read_until_eof(sock) == b""


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /livez HTTP/1.1\r\nHost router\r\n\r\n",  # a header line without its colon
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32,  # TLS spoken to the plain port
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # a bad chunk
    ],
    ids=["header-without-colon", "tls-client-hello", "bad-chunk-size"],
)
def test_bytes_that_are_not_http_get_400_in_the_error_format(small_router: RouterServer, request_bytes: bytes) -> None:
    with connect(port_of(small_router)) as sock:
        sock.sendall(request_bytes)
        refused = answered(sock, 400)
        assert refused.headers["content-type"] == "application/json"
        assert refused.headers["connection"] == "close"
        error = json.loads(refused.body)["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_http_request")
        assert read_until_eof(sock) == b""


def test_a_header_sent_in_pieces_is_counted_across_reads(small_router: RouterServer) -> None:
    with connect(port_of(small_router)) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: router\r\nX-Pad: ")
        answered = False
        for _ in range(SMALL_LIMIT // 512 + 4):
            if select.select([sock], [], [], 0)[0]:
                answered = True
                break
            sock.sendall(b"a" * 512)
        answer = read_until_eof(sock)
        assert answered or answer
        assert status_of(answer) in (431, None)


def test_a_pipelined_request_past_the_limit_is_refused_after_the_one_before_it(small_router: RouterServer) -> None:
    with connect(port_of(small_router)) as sock:
        # One write, most likely one read: a request, then one with many short header lines, 1.5 x the limit
        # in all, so it begins inside the read in which the first ends, and is counted from its parsed lines.
        many = [(f"X-Line-{number:03d}", "a" * 40) for number in range(3 * SMALL_LIMIT // 2 // 56)]
        sock.sendall(get_request() + get_request("/livez", *many))
        assert statuses_of(read_until_eof(sock)) in ([200, 431], [200])


def test_a_body_in_the_same_write_as_its_headers_does_not_count(small_router: RouterServer) -> None:
    body = json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "x" * (16 * SMALL_LIMIT)}]})
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with connect(port_of(small_router)) as sock:
        sock.sendall(head.encode() + body.encode())  # ~64 KiB: the router's first read holds much of the body
        answer = read_response(sock)
        assert answer is not None
        assert answer.status == 404, answer.body  # the app read the whole body, then found no such model
        assert json.loads(answer.body)["error"]["code"] == "model_not_found"
        sock.sendall(get_request())  # and the parser is where it should be: the next request is served
        answered(sock, 200)


def flood(port: int, total: int, chunk: int, outcome: list[tuple[int, int | None]]) -> None:
    """Send one header `total` bytes long in `chunk`s, stopping once the router answers or closes."""
    sent = 0
    with connect(port, timeout=120) as sock:
        try:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: router\r\nX-Flood: ")
            payload = b"a" * chunk
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(payload)
                sent += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_until_eof(sock)
    outcome.append((sent, status_of(answer)))


def test_four_connections_sending_64_mib_headers_cost_almost_no_memory(default_router: RouterServer) -> None:
    router = psutil.Process(default_router.process.process.pid)
    with connect(port_of(default_router)) as sock:  # warm up the request path first
        sock.sendall(get_request(close=True))
        assert status_of(read_until_eof(sock)) == 200
    before = router.memory_info().rss
    outcome: list[tuple[int, int | None]] = []
    senders = [threading.Thread(target=flood, args=(port_of(default_router), 64 * MiB, 64 * 1024, outcome))
               for _ in range(4)]  # fmt: skip
    for sender in senders:
        sender.start()
    peak = before
    deadline = time.monotonic() + 300
    while any(sender.is_alive() for sender in senders) and time.monotonic() < deadline:
        peak = max(peak, router.memory_info().rss)
        senders[0].join(timeout=0.05)
    for sender in senders:
        sender.join(timeout=max(0.0, deadline - time.monotonic()))
    peak = max(peak, router.memory_info().rss)
    growth = peak - before
    print(f"\nrouter RSS {before / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB (+{growth / MiB:.2f} MiB); sent {outcome}")
    assert len(outcome) == 4, "a sender did not finish"
    assert all(status in (431, None) for _sent, status in outcome)
    # Each stopped early: what it sent is what the kernel's socket buffers took before the router closed.
    assert all(sent < 64 * MiB for sent, _status in outcome), "a sender was never stopped"
    assert growth <= 16 * MiB


@pytest.fixture(scope="module")
def deadline_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterServer]:
    with running_router(tmp_path_factory.mktemp("deadline"), MODELS, header_timeout_seconds="1") as router:
        yield router


def test_idle_and_slowloris_connections_are_closed_at_the_header_deadline(deadline_router: RouterServer) -> None:
    port = port_of(deadline_router)
    keep_alive = connect(port)  # a normal client, making requests on one connection throughout
    keep_alive.sendall(get_request())
    answered(keep_alive, 200)
    opened = time.monotonic()
    idle = [connect(port) for _ in range(500)]
    slow = [connect(port) for _ in range(5)]
    selector = selectors.DefaultSelector()
    for sock in idle + slow:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    slow_bytes = {sock: itertools.cycle(get_request("/livez", ("X-Slow", "a" * 1000))) for sock in slow}
    answers: dict[socket.socket, bytes] = {sock: b"" for sock in idle + slow}
    closed_in: dict[socket.socket, float] = {}
    served = 1
    next_tick = time.monotonic()
    deadline = time.monotonic() + 60
    try:
        while len(closed_in) < len(answers) and time.monotonic() < deadline:
            for key, _events in selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                except BlockingIOError:
                    continue
                if chunk:
                    answers[sock] += chunk
                    continue
                closed_in[sock] = time.monotonic() - opened
                selector.unregister(sock)
            if time.monotonic() >= next_tick:  # slowloris pace: one byte per connection per 0.2 s
                next_tick += 0.2
                for sock in slow:
                    if sock not in closed_in:
                        with contextlib.suppress(OSError):
                            sock.send(bytes([next(slow_bytes[sock])]))
                keep_alive.sendall(get_request())
                answered(keep_alive, 200)
                served += 1
        idle_times = sorted(closed_in[sock] for sock in idle if sock in closed_in)
        slow_times = sorted(closed_in[sock] for sock in slow if sock in closed_in)
        print(f"\nidle closed after {idle_times[0]:.2f}..{idle_times[-1]:.2f} s" if idle_times else "\nno idle closed")
        print(f"slowloris closed after {slow_times[0]:.2f}..{slow_times[-1]:.2f} s" if slow_times else "none slow")
        assert len(idle_times) == len(idle), f"{len(idle) - len(idle_times)} idle connections still open"
        assert len(slow_times) == len(slow), f"{len(slow) - len(slow_times)} slowloris connections still open"
        assert all(answers[sock] == b"" for sock in idle)  # nothing to answer: no request began
        assert all(status_of(answers[sock]) in (408, None) for sock in slow)
        keep_alive.sendall(get_request())  # the normal client was never cut off
        answered(keep_alive, 200)
        print(f"the keep-alive client made {served + 1} requests on one connection meanwhile")
    finally:
        selector.close()
        for sock in [keep_alive, *idle, *slow]:
            sock.close()


def test_a_later_request_on_a_keep_alive_connection_has_the_same_deadline(deadline_router: RouterServer) -> None:
    with connect(port_of(deadline_router)) as sock:
        sock.sendall(get_request())
        answered(sock, 200)
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: rou")  # its first bytes, then nothing
        started = time.monotonic()
        answer, seconds = closed_after(sock, started)
        print(f"\nthe unfinished second request was closed after {seconds:.2f} s")
        assert status_of(answer) == 408


CAP = 5


def test_past_the_connection_cap_a_connection_is_closed_unanswered(tmp_path: Path) -> None:
    with running_router(tmp_path, MODELS, max_connections=str(CAP), header_timeout_seconds="60") as router:
        port = port_of(router)
        held = [connect(port) for _ in range(CAP)]  # accepted in order: these take every slot
        try:
            with connect(port, timeout=30) as extra:
                extra.sendall(get_request())
                answer, _seconds = closed_after(extra, time.monotonic())
                assert answer == b""  # closed at once, nothing read and nothing answered
            for sock in held:  # the connections within the cap are served as usual
                sock.sendall(get_request())
                answered(sock, 200)
            held.pop().close()

            def served_again() -> bool:  # once the router has seen that close, a new connection is served
                with connect(port) as sock:
                    sock.sendall(get_request(close=True))
                    return status_of(read_until_eof(sock)) == 200

            wait_for(served_again, "a connection to be served after one of the capped ones closed", timeout=30)
        finally:
            for sock in held:
                sock.close()


def listeners(supervisor: psutil.Process, port: int) -> set[int]:
    return {worker.pid for worker in supervisor.children() for conn in worker.net_connections("tcp")
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port}  # fmt: skip


def worker_of(workers: list[psutil.Process], server_port: int, client_port: int) -> int | None:
    for worker in workers:
        for conn in worker.net_connections("tcp"):
            if conn.laddr and conn.laddr.port == server_port and conn.raddr and conn.raddr.port == client_port:
                return worker.pid
    return None


def test_every_worker_process_applies_the_limits(tmp_path: Path) -> None:
    with running_router(tmp_path, MODELS, workers="2", max_header_bytes=str(SMALL_LIMIT),
                        shutdown_drain_seconds="0") as router:  # fmt: skip
        port = port_of(router)
        supervisor = psutil.Process(router.process.process.pid)
        wait_for(lambda: len(listeners(supervisor, port)) == 2, "both workers listening")
        workers = supervisor.children()
        by_worker: dict[int, socket.socket] = {}
        spare: list[socket.socket] = []
        try:
            for _ in range(64):  # the kernel spreads new connections over the two listeners
                sock = connect(port)
                sock.sendall(get_request())  # served: so the worker has accepted it
                answered(sock, 200)
                owner = worker_of(workers, port, sock.getsockname()[1])
                if owner is not None and owner not in by_worker:
                    by_worker[owner] = sock
                else:
                    spare.append(sock)
                if len(by_worker) == 2:
                    break
            assert len(by_worker) == 2, "every connection went to one worker"
            for sock in by_worker.values():
                sock.sendall(padded_get(SMALL_LIMIT + 1))
                answered(sock, 431)
        finally:
            for sock in [*by_worker.values(), *spare]:
                sock.close()
