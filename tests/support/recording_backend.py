"""An OpenAI-compatible backend on 127.0.0.1 that records each request body and answers from a script.

For what no engine here does on demand: the real Ollama's Gemma 3 270M template has no tools, so it
refuses them, and a tool call that succeeds needs a backend that makes one. The router is the thing
under test; this stands in only for the model's side of the exchange.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.procs import LOOPBACK

# Given a request body: the answer body (non-streamed), or the SSE events (streamed), written as the
# iterable gives them (a generator may pause between events, as an engine does between tokens).
Script = Callable[[dict[str, Any]], tuple[int, dict[str, Any]] | bytes | dict[str, Any] | Iterable[dict[str, Any]]]


@dataclass
class RecordingBackend:
    base_url: str
    bodies: list[dict[str, Any]] = field(default_factory=list)
    hung_up: int = 0


@contextmanager
def recording_backend(script: Script) -> Iterator[RecordingBackend]:
    backend = RecordingBackend(base_url="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self.answer(
                    200, json.dumps({"object": "list", "data": [{"id": "scripted", "object": "model"}]}).encode()
                )
            else:
                self.answer(404, b'{"error": {"message": "not found"}}')

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            backend.bodies.append(body)
            answer = script(body)
            if isinstance(answer, tuple):  # (status, body): a backend that refuses or fails
                status, error = answer
                self.answer(status, json.dumps(error).encode())
                return
            if isinstance(answer, bytes):  # a broken backend's 200: whatever bytes it sends
                self.answer(200, answer, content_type="text/plain")
                return
            if isinstance(answer, dict):
                self.answer(200, json.dumps(answer).encode())
                return
            # A stream: its end is the connection's close, as a body without a length may be.
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                for event in answer:
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                backend.hung_up += 1  # the router closed the stream: how a backend learns the client left

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    server.daemon_threads = True
    backend.base_url = f"http://{LOOPBACK}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield backend
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
