"""MODELFLEET_WORKERS: several router processes on one port, in front of the real Ollama.

Each worker listens on the port itself (SO_REUSEPORT), a scrape of any of them reports them all, the
model's cap is split between them, a worker that dies is replaced, and settings that would count rate
limits per worker are refused before anything starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import OllamaServer, RouterServer, running_router
from tests.support.procs import LOOPBACK, free_port, wait_for

pytestmark = pytest.mark.integration

CAP = 3  # maxInFlight of the one replica: the two workers admit 2 and 1


@pytest.fixture(scope="module")
def router(ollama_server: OllamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterServer]:
    models: list[dict[str, object]] = [{"name": "gemma", "url": ollama_server.base_url,
                                        "upstream_model": ollama_server.model, "max_in_flight": CAP}]  # fmt: skip
    with running_router(tmp_path_factory.mktemp("workers"), models, workers="2", cache_size="0",
                        shutdown_drain_seconds="0") as router:  # fmt: skip
        # Ready means one worker answered; the other may still be starting.
        wait_for(lambda: len(listeners(router)) == 2, "both workers listening")
        yield router


def metric(router: RouterServer, name: str) -> float:
    lines = httpx.get(f"{router.base_url}/metrics", timeout=5).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith((f"{name}{{", f"{name} ")))


def listeners(router: RouterServer) -> set[int]:
    """The pids listening on the router's port: its worker processes."""
    port = int(router.base_url.rsplit(":", 1)[1])
    workers = psutil.Process(router.process.process.pid).children()
    return {worker.pid for worker in workers for conn in worker.net_connections("tcp")
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port}  # fmt: skip


def chat(router: RouterServer, number: int) -> int:
    # A client of its own per request: a new connection, which the kernel gives to either worker.
    with httpx.Client(timeout=120) as client:
        body = {"model": "gemma", "max_tokens": 1, "messages": [{"role": "user", "content": f"Say {number}."}]}
        return client.post(f"{router.openai_base_url}/chat/completions", json=body).status_code


def test_every_worker_listens_and_a_scrape_counts_them_all(router: RouterServer) -> None:
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda number: chat(router, number), range(32)))
    assert statuses == [200] * 32
    # Each scrape lands on either worker (new connections); every one must report all 32. With 32
    # connections, the chance that one worker served them all is 2 in 2**32.
    for _ in range(6):
        with httpx.Client() as client:
            text = client.get(f"{router.base_url}/metrics").text
        served = [line for line in text.splitlines() if line.startswith("modelfleet_requests_total{")]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in served) == 32


def test_the_workers_split_the_models_cap(router: RouterServer) -> None:
    assert metric(router, "modelfleet_admission_slots") == CAP


def test_a_worker_that_dies_is_replaced(router: RouterServer) -> None:
    before = listeners(router)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(listeners(router)) == 2 and victim not in listeners(router), "a new worker listening")
    assert chat(router, 99) == 200
    # The dead worker's gauges are gone from the sums: the two live workers' shares, not three.
    assert metric(router, "modelfleet_admission_slots") == CAP


def test_sigterm_stops_every_worker(ollama_server: OllamaServer, tmp_path: Path) -> None:
    models: list[dict[str, object]] = [{"name": "gemma", "url": ollama_server.base_url}]
    with running_router(tmp_path, models, workers="2", shutdown_drain_seconds="0") as router:
        wait_for(lambda: len(listeners(router)) == 2, "both workers listening")
        supervisor = psutil.Process(router.process.process.pid)
        workers = supervisor.children()
        supervisor.send_signal(signal.SIGTERM)
        assert router.process.process.wait(timeout=60) == 0
        _gone, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == []


def run_router(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "MODELFLEET_HOST": LOOPBACK,
           **{f"MODELFLEET_{key.upper()}": value for key, value in settings.items()}}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "modelfleet.server"], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_in_process_rate_limits_with_several_workers_are_refused(tmp_path: Path) -> None:
    completed = run_router(tmp_path, workers="2", port=str(free_port()), rate_limit_requests_per_minute="60")
    assert completed.returncode != 0
    assert "MODELFLEET_WORKERS=2 needs MODELFLEET_REDIS_URL" in completed.stderr
    assert "MODELFLEET_RATE_LIMIT_REQUESTS_PER_MINUTE" in completed.stderr


def test_workers_that_cannot_bind_stop_instead_of_looping(tmp_path: Path) -> None:
    with socket.socket() as taken:  # bound without SO_REUSEPORT: no worker can share it
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        completed = run_router(tmp_path, workers="2", port=str(port), rate_limit_requests_per_minute="0")
    assert completed.returncode == 1
    assert "died 3 times within 30 s: stopping" in completed.stderr
