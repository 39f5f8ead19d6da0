"""Ollama's request log, as its web framework (GIN) writes it: one line per request, when it ends.

    [GIN] 2026/11/30 - 22:59:01 | 200 |  1.2s |  10.244.0.15 | POST  "/api/chat"

Its own time has one-second resolution, so the e2e tests read the log with `kubectl logs --timestamps`,
whose prefix (the container runtime's, in nanoseconds) dates the end; the latency dates the start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

GIN_LINE = re.compile(r"\[GIN\][^|]*\|\s*(\d{3})\s*\|\s*([^|]+?)\s*\|\s*([0-9a-f.:]+)\s*\|\s*(\w+)\s+\"([^\"]+)\"")
GO_DURATION_PART = re.compile(r"([0-9.]+)(h|ms|m|s|µs|ns)")
GO_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "µs": 1e-6, "ns": 1e-9}
# `kubectl logs --timestamps`: RFC 3339 with up to nanoseconds, then one space.
RUNTIME_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d) ")
GENERATION_PATHS = ("/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions")


def go_duration_seconds(text: str) -> float:
    """A Go time.Duration as Go prints it (GIN's access log): "126.5µs", "13.4s", "4m9s", "1h2m3.5s"."""
    parts = GO_DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(number) * GO_DURATION_UNITS[unit] for number, unit in parts)


@dataclass(frozen=True)
class EngineRequest:
    """One generation request an Ollama pod served: who sent it, where, and when it started and ended."""

    address: str
    path: str
    status: int
    started: datetime
    ended: datetime


def runtime_stamp(line: str) -> tuple[datetime, str] | None:
    """The container runtime's time of a log line and the line without it."""
    match = RUNTIME_STAMP.match(line)
    if match is None:
        return None
    whole, fraction, zone = match.groups()
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    stamp = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone)).replace(microsecond=micros)
    return stamp.astimezone(UTC), line[match.end() :]


def engine_requests(log_with_timestamps: str) -> list[EngineRequest]:
    """Every generation request in a log read with `kubectl logs --timestamps`, in the order they ended."""
    requests = []
    for line in log_with_timestamps.splitlines():
        stamped = runtime_stamp(line)
        if stamped is None:
            continue
        ended, text = stamped
        match = GIN_LINE.search(text)
        if match is None or match.group(5) not in GENERATION_PATHS:
            continue
        status, latency, address, _method, path = match.groups()
        started = ended - timedelta(seconds=go_duration_seconds(latency))
        requests.append(EngineRequest(address=address, path=path, status=int(status), started=started, ended=ended))
    return requests
