"""Streaming hygiene with the real Ollama: waiting at zero replicas with heartbeats, replicas that appear
while requests wait, and a backend that dies mid-stream."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from modelfleet.server.app import create_app
from modelfleet.server.model_spec import ModelSpec
from modelfleet.server.registry import ModelRegistry
from modelfleet.server.settings import RouterSettings
from tests.conftest import OllamaServer, running_router, start_ollama
from tests.support.procs import LOOPBACK, free_port, wait_until

pytestmark = pytest.mark.integration


@dataclass
class InProcessRouter:
    """The router app served by uvicorn on a loop we own, so the test can change its registry the way
    discovery does (discovery itself is proven against the cluster in tests/e2e)."""

    base_url: str
    loop: asyncio.AbstractEventLoop
    registry: ModelRegistry

    def set_models(self, specs: list[ModelSpec]) -> None:
        done = threading.Event()

        def apply() -> None:
            self.registry.replace_source("cluster", specs)
            done.set()

        self.loop.call_soon_threadsafe(apply)
        assert done.wait(5)

    def gauge(self, name: str, model: str) -> float:
        for line in httpx.get(f"{self.base_url}/metrics", timeout=5).text.splitlines():
            if line.startswith(f'{name}{{model="{model}"'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture
def in_process_router() -> Iterator[InProcessRouter]:
    settings = RouterSettings(auth_required=False, rate_limit_requests_per_minute=0, heartbeat_seconds=0.25)
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=port, log_level="warning", lifespan="on"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    base_url = f"http://{LOOPBACK}:{port}"
    try:
        wait_until(lambda: httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200, timeout=20)
        yield InProcessRouter(base_url, loop, app.state.services.registry)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        loop.close()


def pending_model(ollama: OllamaServer, endpoints: tuple[str, ...] = (), timeout: float = 60) -> ModelSpec:
    return ModelSpec(name="pending", api="ollama", upstream_model=ollama.model, endpoints=endpoints,
                     max_in_flight_per_replica=1, request_timeout_seconds=timeout, source="cluster")  # fmt: skip


CHAT = {"model": "pending", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8, "stream": True}


def test_requests_wait_at_zero_replicas_with_heartbeats_and_start_when_one_appears(
    in_process_router: InProcessRouter, ollama_server: OllamaServer
) -> None:
    router = in_process_router
    router.set_models([pending_model(ollama_server)])
    lines: list[tuple[float, str]] = []
    status: list[int] = []

    def stream() -> None:
        with httpx.stream("POST", f"{router.base_url}/v1/chat/completions", json=CHAT, timeout=60) as response:
            status.append(response.status_code)
            for line in response.iter_lines():
                lines.append((time.monotonic(), line))

    client = threading.Thread(target=stream)
    client.start()
    wait_until(lambda: sum(line == ": ping" for _, line in lines) >= 3, timeout=10)
    assert status == [200]
    assert router.gauge("modelfleet_queue_depth", "pending") == 1
    assert router.gauge("modelfleet_in_flight_requests", "pending") == 0
    assert all(line in (": ping", "") for _, line in lines), "nothing but heartbeats while no replica is ready"

    appeared = time.monotonic()
    router.set_models([pending_model(ollama_server, (ollama_server.base_url,))])
    client.join(timeout=60)
    data = [line for at, line in lines if line.startswith("data: ") and at >= appeared]
    assert data[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in data[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert router.gauge("modelfleet_queue_depth", "pending") == 0
    wait_until(lambda: router.gauge("modelfleet_in_flight_requests", "pending") == 0, timeout=5)


def test_waiting_at_zero_replicas_is_bounded(in_process_router: InProcessRouter, ollama_server: OllamaServer) -> None:
    router = in_process_router
    router.set_models([pending_model(ollama_server, timeout=1)])
    plain = httpx.post(f"{router.base_url}/v1/chat/completions", json={**CHAT, "stream": False}, timeout=30)
    assert plain.status_code == 504
    assert plain.json()["error"]["code"] == "queue_timeout"

    streamed = httpx.post(f"{router.base_url}/v1/chat/completions", json=CHAT, timeout=30)
    assert streamed.status_code == 200, "a stream gets its 200 at once, to carry heartbeats"
    events = [line for line in streamed.text.split("\n") if line]
    assert ": ping" in events
    error = json.loads(events[-2].removeprefix("data: "))
    assert error["error"]["code"] == "queue_timeout"
    assert events[-1] == "data: [DONE]"
    assert router.gauge("modelfleet_queue_depth", "pending") == 0


def test_a_model_removed_while_requests_wait_fails_them_at_once(
    in_process_router: InProcessRouter, ollama_server: OllamaServer
) -> None:
    router = in_process_router
    router.set_models([pending_model(ollama_server)])
    answers: list[httpx.Response] = []
    waiter = threading.Thread(target=lambda: answers.append(
        httpx.post(f"{router.base_url}/v1/chat/completions", json={**CHAT, "stream": False}, timeout=30)))  # fmt: skip
    waiter.start()
    wait_until(lambda: router.gauge("modelfleet_queue_depth", "pending") == 1, timeout=10)
    router.set_models([])
    waiter.join(timeout=10)
    assert answers[0].status_code == 404
    assert answers[0].json()["error"]["code"] == "model_not_found"


def test_backend_killed_mid_stream_becomes_an_error_event(tmp_path: Path) -> None:
    """A second real Ollama, SIGKILLed while it streams: the client gets an SSE error event that says the
    backend failed (not that it went quiet), then [DONE], and the router's gauges return to 0."""
    for doomed in start_ollama(tmp_path / "ollama"):
        models: list[dict[str, object]] = [{"name": "doomed", "url": doomed.base_url, "upstream_model": doomed.model}]
        with running_router(tmp_path / "router", models) as router:
            body = {"model": "doomed", "messages": [{"role": "user", "content": "Tell a long story."}],
                    "max_tokens": 400, "stream": True}  # fmt: skip
            lines: list[tuple[float, str]] = []
            killed_at = 0.0
            with httpx.stream("POST", f"{router.openai_base_url}/chat/completions", json=body, timeout=60) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    lines.append((time.monotonic(), line))
                    if sum(text.startswith("data: {") for _, text in lines) == 3 and not killed_at:
                        killed_at = time.monotonic()
                        # The whole group, as when a pod dies: `ollama serve` and its model runner.
                        os.killpg(doomed.process.process.pid, signal.SIGKILL)
            events = [(at, line) for at, line in lines if line.startswith("data: ")]
            error_at, error_line = events[-2]
            # upstream_error: the router saw the connection die. Had it noticed only through silence, the
            # code would be upstream_timeout, so no clock is needed to tell "at once" from "timed out".
            assert json.loads(error_line.removeprefix("data: "))["error"]["code"] == "upstream_error"
            print(f"\nerror event {1000 * (error_at - killed_at):.0f} ms after the kill")
            assert events[-1][1] == "data: [DONE]"
            metrics = httpx.get(f"{router.base_url}/metrics", timeout=5).text
            assert 'modelfleet_in_flight_requests{model="doomed"} 0.0' in metrics
            assert 'modelfleet_upstream_errors_total{code="mid_stream",model="doomed"} 1.0' in metrics


class LongFinalLineOllama(http.server.BaseHTTPRequestHandler):
    """Answers /api/generate as Ollama does, with a final line of about 1 MiB: many socket reads, and
    longer than the line limits of common HTTP clients (aiohttp's was 128 or 512 KiB). It speaks
    HTTP/1.0, so the body ends when the connection closes, which the router must read as the end.

    A stand-in, because the real one writes such a line only after a context of tens of thousands of
    tokens (its `context` array), which would take this machine many minutes to evaluate.
    """

    context_tokens = 130_000  # about 1 MiB of JSON
    # A line of JSON that is not an object, sent instead of the final line (a garbled backend).
    garbled = False

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-type", "application/x-ndjson")
        self.end_headers()
        for word in ("Once", " upon"):
            self.wfile.write(json.dumps({"model": "m", "response": word, "done": False}).encode() + b"\n")
        final = {"model": "m", "response": "", "done": True, "done_reason": "stop", "prompt_eval_count": 3,
                 "eval_count": 2, "context": list(range(100_000, 100_000 + self.context_tokens))}  # fmt: skip
        self.wfile.write(b'"not an object"\n' if self.garbled else json.dumps(final).encode() + b"\n")

    def log_message(self, *_: object) -> None:
        pass


def stream_from(handler: type[http.server.BaseHTTPRequestHandler], tmp_path: Path) -> list[str]:
    """The SSE data lines of a streamed completion through the router, from a stand-in Ollama."""
    backend = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
    serving = threading.Thread(target=backend.serve_forever, daemon=True)
    serving.start()
    try:
        url = f"http://{LOOPBACK}:{backend.server_address[1]}"
        models: list[dict[str, object]] = [{"name": "long", "url": url, "upstream_model": "m", "api": "ollama"}]
        with running_router(tmp_path, models) as router:
            body = {"model": "long", "prompt": "Tell", "max_tokens": 8, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            answer = httpx.post(f"{router.openai_base_url}/completions", json=body, timeout=60)
            return [line.removeprefix("data: ") for line in answer.text.splitlines() if line.startswith("data: ")]
    finally:
        backend.shutdown()
        backend.server_close()


def test_a_backend_line_of_a_megabyte_is_read_whole_not_dropped(tmp_path: Path) -> None:
    events = stream_from(LongFinalLineOllama, tmp_path)
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(event) for event in events[:-1]]
    assert not [c for c in chunks if "error" in c], chunks
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Once upon"
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_a_garbled_backend_line_ends_the_stream_with_an_error_event(tmp_path: Path) -> None:
    class Garbled(LongFinalLineOllama):
        garbled = True

    events = stream_from(Garbled, tmp_path)
    assert events[-1] == "[DONE]", events[-3:]
    assert json.loads(events[-2])["error"]["code"] == "upstream_error", events[-3:]
