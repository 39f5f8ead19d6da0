#!/usr/bin/env python3
"""The blob host of the local registry: serves the registry's stored blobs by path, with Range.

Ollama pulls a blob in two steps, as from registry.ollama.ai: a GET on the registry that must
answer with a redirect to a host of another name (a CDN there), then ranged GETs of 100 MB parts
on that host. A registry that serves the blob itself (200) makes ``ollama pull`` fail with "http:
no Location header in response" (ollama/ollama#6308, #7244; the fixes #6675, #9737 were not
merged). So hack/registry.sh runs distribution's registry with its ``redirect`` storage middleware
pointed here, on a second address of the node's bridge, and this server answers the redirected
requests from the registry's filesystem storage: read-only, blob data files only.

    registry_blobs.py --root DIR --listen ADDR:PORT --metrics 127.0.0.1:PORT

Metrics (Prometheus text format, on the loopback listener):
    registry_blobs_requests_total{method,code}      requests for blob paths, by method (GET, HEAD) and status
    registry_blobs_sent_bytes_total{digest}         body bytes sent, by blob digest
One access log line per request goes to stdout. Stdlib only: this runs outside any virtualenv.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import threading
import time
from collections import Counter
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# What distribution's filesystem driver stores a blob as, and all that is served.
BLOB_PATH = re.compile(r"/docker/registry/v2/blobs/sha256/([0-9a-f]{2})/([0-9a-f]{64})/data")
RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.sent: Counter[str] = Counter()

    def request(self, method: str, code: int) -> None:
        with self._lock:
            self.requests[(method, code)] += 1

    def add_sent(self, digest: str, count: int) -> None:
        with self._lock:
            self.sent[digest] += count

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP registry_blobs_requests_total Requests to the registry's blob host.",
                "# TYPE registry_blobs_requests_total counter",
                *(
                    f'registry_blobs_requests_total{{method="{method}",code="{code}"}} {count}'
                    for (method, code), count in sorted(self.requests.items())
                ),
                "# HELP registry_blobs_sent_bytes_total Blob bytes sent by the registry's blob host.",
                "# TYPE registry_blobs_sent_bytes_total counter",
                *(f'registry_blobs_sent_bytes_total{{digest="{d}"}} {n}' for d, n in sorted(self.sent.items())),
            ]
        return "\n".join(lines) + "\n"


class Unsatisfiable(ValueError):
    """A byte range that starts past the end of the blob (416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) of a single byte range, or None to send the whole blob; raises Unsatisfiable."""
    match = RANGE.fullmatch(header.strip()) if header else None
    if not match or match.group(1) == match.group(2) == "":
        return None  # none, malformed or multi-range: RFC 9110 allows ignoring it and sending everything
    start, end = match.groups()
    if start == "":
        first, last = max(size - int(end), 0), size - 1
    else:
        first, last = int(start), min(int(end), size - 1) if end else size - 1
    if first > last or first >= size:
        raise Unsatisfiable(header)
    return first, last


def blob_handler(root: Path, metrics: Metrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "modelfleet-registry-blobs"
        protocol_version = "HTTP/1.1"

        def do_HEAD(self) -> None:
            self.serve(body=False)

        def do_GET(self) -> None:
            self.serve(body=True)

        def serve(self, body: bool) -> None:
            match = BLOB_PATH.fullmatch(self.path.split("?", 1)[0])
            path = root / self.path.lstrip("/").split("?", 1)[0] if match else None
            if match is None or path is None:
                self.finish_empty(HTTPStatus.NOT_FOUND, count=False)  # not a blob: probes, mistakes
                return
            if not path.is_file():
                self.finish_empty(HTTPStatus.NOT_FOUND)
                return
            digest = f"sha256:{match.group(2)}"
            with path.open("rb") as blob:
                size = os.fstat(blob.fileno()).st_size
                try:
                    wanted = parse_range(self.headers.get("Range"), size)
                except Unsatisfiable:
                    self.finish_empty(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{size}"})
                    return
                first, last = wanted or (0, size - 1)
                status = HTTPStatus.OK if wanted is None else HTTPStatus.PARTIAL_CONTENT
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(last - first + 1))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Docker-Content-Digest", digest)
                self.send_header("ETag", f'"{digest}"')
                if status == HTTPStatus.PARTIAL_CONTENT:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self.end_headers()
                metrics.request(self.command, status)
                if body and last >= first:
                    self.wfile.flush()
                    sent = 0
                    try:
                        sent = self.connection.sendfile(blob, first, last - first + 1)
                    finally:
                        metrics.add_sent(digest, sent)

        def finish_empty(self, status: HTTPStatus, headers: dict[str, str] | None = None, count: bool = True) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            if count:
                metrics.request(self.command, status)

        def log_message(self, format: str, *args: object) -> None:
            sys.stdout.write(f"{self.address_string()} - - [{self.log_date_time_string()}] {format % args}\n")
            sys.stdout.flush()

    return Handler


def metrics_handler(metrics: Metrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            payload = metrics.render().encode()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # several pods may start pulling at once


def address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, required=True, help="the registry's filesystem rootdirectory")
    parser.add_argument("--listen", type=address, required=True, help="ADDR:PORT for blobs")
    parser.add_argument("--metrics", type=address, required=True, help="ADDR:PORT for /metrics")
    args = parser.parse_args(argv)
    metrics = Metrics()
    blobs = Server(args.listen, blob_handler(args.root.resolve(), metrics))
    stats = Server(args.metrics, metrics_handler(metrics))
    threading.Thread(target=stats.serve_forever, daemon=True).start()
    print(f"{time.strftime('%FT%T')} serving {args.root} on {args.listen[0]}:{args.listen[1]}", file=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):
        blobs.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
