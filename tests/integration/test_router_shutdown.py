"""Router SIGTERM during streams, with the real Ollama: readiness fails first, new connections are then
refused cleanly, and in-flight (and queued) streams finish within the grace period."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import OllamaServer, running_router, settled_chat_calls
from tests.support.procs import LOOPBACK, wait_until

pytestmark = pytest.mark.integration

# A prompt that keeps Gemma talking until max_tokens, so a stream outlives the drain period.
LONG_ANSWER = "Count from 1 to 300, separated by commas."


@dataclass
class StreamRecord:
    content: str = ""
    finish_reason: str | None = None
    done: bool = False  # saw `data: [DONE]`
    errors: list[str] = field(default_factory=list)
    failure: str | None = None  # the connection broke or the status was not 200
    first_token: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)


def stream_chat(base_url: str, model: str, max_tokens: int, record: StreamRecord) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": LONG_ANSWER}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "use_cache": False}  # fmt: skip
    try:
        with (
            httpx.Client(timeout=60) as http,
            http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response,
        ):
            if response.status_code != 200:
                record.failure = f"status {response.status_code}"
                return
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line.removeprefix("data: ")
                if payload == "[DONE]":
                    record.done = True
                    continue
                event = json.loads(payload)
                if "error" in event:
                    record.errors.append(event["error"].get("code") or event["error"].get("type"))
                    continue
                for choice in event.get("choices", []):
                    record.content += choice.get("delta", {}).get("content") or ""
                    record.finish_reason = choice.get("finish_reason") or record.finish_reason
                if record.content:
                    record.first_token.set()
    except httpx.HTTPError as exc:
        record.failure = f"{type(exc).__name__}: {exc}"
    finally:
        record.ended.set()


def start_stream(base_url: str, model: str, max_tokens: int) -> StreamRecord:
    record = StreamRecord()
    threading.Thread(target=stream_chat, args=(base_url, model, max_tokens, record), daemon=True).start()
    return record


def connection_refused(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) != 0


def gemma_behind_router(ollama: OllamaServer, max_in_flight: int) -> list[dict[str, object]]:
    return [{"name": "gemma", "url": ollama.base_url, "upstream_model": ollama.model, "max_in_flight": max_in_flight}]


def in_flight(base_url: str) -> float:
    for line in httpx.get(f"{base_url}/metrics", timeout=5).text.splitlines():
        if line.startswith("modelfleet_in_flight_requests{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_sigterm_drains_refuses_new_connections_and_finishes_streams(
    ollama_server: OllamaServer, tmp_path: Path
) -> None:
    # One request at a time, so the second stream is still waiting in the router's queue at SIGTERM.
    models = gemma_behind_router(ollama_server, max_in_flight=1)
    drain_seconds = 2.0
    with running_router(
        tmp_path, models, shutdown_drain_seconds=str(drain_seconds), shutdown_grace_seconds="60"
    ) as router:
        port = int(router.base_url.rsplit(":", 1)[1])
        running = start_stream(router.base_url, "gemma", max_tokens=120)
        assert running.first_token.wait(60), f"no token from the first stream: {running}"
        queued = start_stream(router.base_url, "gemma", max_tokens=40)
        wait_until(lambda: in_flight(router.base_url) == 1 and not queued.ended.is_set(), timeout=10)

        signalled = time.monotonic()
        os.kill(router.process.process.pid, signal.SIGTERM)

        # 1. Readiness fails first, while the listener still accepts.
        wait_until(lambda: httpx.get(f"{router.base_url}/readyz", timeout=1).status_code == 503, timeout=2)
        readiness_failed_after = time.monotonic() - signalled
        assert httpx.get(f"{router.base_url}/readyz", timeout=1).json() == {"status": "draining"}

        # 2. During the drain a request that still arrives is served, and told to close its connection.
        late = httpx.get(f"{router.base_url}/v1/models", timeout=5)
        assert late.status_code == 200
        assert late.headers["connection"] == "close"
        assert not running.ended.is_set(), "the first stream ended during the drain; make it longer"

        # 3. After the drain, new connections are refused (no half-written response), streams still run.
        wait_until(lambda: connection_refused(port), timeout=drain_seconds + 5)
        refused_after = time.monotonic() - signalled
        assert refused_after >= drain_seconds
        assert not queued.ended.is_set(), "the queued stream ended before the listener closed; make it longer"

        # 4. Both streams finish normally within the grace period, then the process exits.
        assert running.ended.wait(60)
        assert queued.ended.wait(60)
        for record in (running, queued):
            assert record.failure is None, record.failure
            assert record.errors == []
            assert record.done, "stream ended without [DONE]"
            assert record.finish_reason in {"stop", "length"}
            assert record.content
        router.process.process.wait(timeout=10)
        exited_after = time.monotonic() - signalled
        print(  # the figures docs/reliability.md reports
            f"\nreadiness 503 after {readiness_failed_after * 1000:.0f} ms, refused after {refused_after:.1f} s, "
            f"streams of {len(running.content)} and {len(queued.content)} chars finished, "
            f"exit after {exited_after:.1f} s"
        )
        assert "Traceback" not in router.process.log_path.read_text(errors="replace")


def test_streams_longer_than_the_grace_period_are_cut_and_their_generations_stopped(
    ollama_server: OllamaServer, tmp_path: Path
) -> None:
    models = gemma_behind_router(ollama_server, max_in_flight=4)
    before = settled_chat_calls(ollama_server)
    with running_router(tmp_path, models, shutdown_drain_seconds="0", shutdown_grace_seconds="1") as router:
        endless = start_stream(router.base_url, "gemma", max_tokens=2000)
        assert endless.first_token.wait(60)
        signalled = time.monotonic()
        os.kill(router.process.process.pid, signal.SIGTERM)
        assert endless.ended.wait(15)
        router.process.process.wait(timeout=15)
        exited_after = time.monotonic() - signalled
    assert not endless.done, "a stream cut by the grace period must not look complete"
    # The cut reached Ollama: its handler for the generation returned, long before 2,000 tokens.
    wait_until(lambda: settled_chat_calls(ollama_server) == before + 1, timeout=10)
    print(f"\ncut after {exited_after:.1f} s with {len(endless.content)} chars streamed")
