"""HTTP/1.1 over a plain socket, for tests that must control every byte a client sends (and when)."""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass

from tests.support.procs import LOOPBACK


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def get_request(path: str = "/livez", *headers: tuple[str, str], close: bool = False) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: router", *(f"{name}: {value}" for name, value in headers)]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def read_response(sock: socket.socket) -> Response | None:
    """One response with a Content-Length (what the router's own answers carry), or None at EOF first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    if len(body) > length:
        raise AssertionError(f"{len(body) - length} bytes after the response: read them with read_until_eof")
    return Response(int(status_line.split(" ", 2)[1]), headers, body)


def statuses_of(answer: bytes) -> list[int]:
    """The statuses of every response in `answer` (what a server sent until it closed)."""
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


def read_until_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (the socket's timeout bounds the wait); a reset ends it too."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def status_of(answer: bytes) -> int | None:
    """The status of the first response in `answer`, None if there is none (a bare close)."""
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    return int(answer.split(b" ", 2)[1])


def closed_after(sock: socket.socket, opened_at: float) -> tuple[bytes, float]:
    """What the server sent before it closed `sock`, and how long after `opened_at` that was."""
    answer = read_until_eof(sock)
    return answer, time.monotonic() - opened_at
