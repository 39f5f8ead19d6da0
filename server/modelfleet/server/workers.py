"""Several router processes on one port: `MODELFLEET_WORKERS=N`.

One router process is one event loop on one core. With N workers, a supervisor starts N copies of
`python -m modelfleet.server`, and each binds the same address with SO_REUSEPORT: the kernel spreads
new connections across their listeners, and no process hands sockets to another.

What stays right, and how (docs/benchmarks.md and docs/router.md say the same):

- **Admission.** Each worker is counted as one more router: it admits its share of a model's cap,
  exactly as router replicas share it (registry.py). N workers in each of R pods make N x R sharers.
- **Metrics.** prometheus_client's multiprocess mode: every worker writes its samples to files in
  one directory, and whichever worker answers a scrape reads them all. Counters and histograms add
  up; the queue depth, in-flight and slot gauges are summed over live workers.
- **Rate limits** must be counted in one place: with several workers they need Redis. In-process
  limits would count per worker, so a key could get N times its limit; the router refuses to start
  that way (`check_limits`).
- **The cache** is per worker in process (fewer hits, never a wrong answer), shared with Redis.
- **Shutdown.** SIGTERM and SIGINT are passed to every worker, which drain as one process does. A
  worker that dies is started again, unless it died 3 times within 30 s (a port it cannot bind, a
  setting it refuses): then all stop, so a broken configuration fails instead of looping.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from prometheus_client import multiprocess

if TYPE_CHECKING:
    from modelfleet.server.settings import RouterSettings

logger = logging.getLogger("modelfleet.server.workers")

WORKER_INDEX_ENV = "MODELFLEET_WORKER_INDEX"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A worker that died this often within this window is not started again: it would only fail again.
CRASH_LOOP = (3, 30.0)


@dataclass(frozen=True)
class WorkerSlot:
    """This process's place among the router processes of its pod (or host)."""

    index: int = 0
    count: int = 1


def this_worker(count: int) -> WorkerSlot:
    """The slot the supervisor gave this process, or the only one."""
    index = os.environ.get(WORKER_INDEX_ENV)
    return WorkerSlot(int(index), count) if index is not None and count > 1 else WorkerSlot()


def check_limits(settings: RouterSettings, workers: int) -> str | None:
    """Why these settings cannot run as `workers` processes, or None."""
    if workers <= 1 or settings.redis_url is not None:
        return None
    limited = [
        name
        for name, value in (
            ("MODELFLEET_RATE_LIMIT_REQUESTS_PER_MINUTE", settings.rate_limit_requests_per_minute),
            ("MODELFLEET_RATE_LIMIT_TOKENS_PER_MINUTE", settings.rate_limit_tokens_per_minute),
        )
        if value
    ]
    limited += [f"the model {model.name}" for model in settings.all_models()
                if model.requests_per_minute or model.tokens_per_minute]  # fmt: skip
    if settings.api_keys_file is not None:
        limited.append("MODELFLEET_API_KEYS_FILE (keys may carry limits)")
    if not limited:
        return None
    return (
        f"MODELFLEET_WORKERS={workers} needs MODELFLEET_REDIS_URL: rate limits are set ({', '.join(limited)}), "
        "and without Redis each worker process would count them on its own, so a key could get "
        f"{workers} times its limit. Set MODELFLEET_REDIS_URL, or run one worker."
    )


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening address that other processes may bind too (SO_REUSEPORT); the kernel spreads connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """Starts the workers, passes signals on, restarts a worker that dies, and ends when they all have."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.metrics_dir = tempfile.mkdtemp(prefix="modelfleet-metrics-")
        self.children: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}  # pid -> (index, process)
        self.deaths: dict[int, list[float]] = {}  # index -> when its processes died
        self.stopping = False
        self.exit_code = 0

    def start(self, index: int) -> None:
        env = {**os.environ, WORKER_INDEX_ENV: str(index), METRICS_DIR_ENV: self.metrics_dir}
        process = subprocess.Popen([sys.executable, "-m", "modelfleet.server"], env=env)
        self.children[process.pid] = (index, process)
        logger.info("worker %d started (pid %d)", index, process.pid)

    def forward(self, sig: int, _frame: FrameType | None) -> None:
        self.stopping = True
        for _index, process in self.children.values():
            if process.poll() is None:
                process.send_signal(sig)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.forward)
        try:
            for index in range(self.workers):
                self.start(index)
            while self.children:
                pid, status = os.wait()
                if pid not in self.children:
                    continue
                index, _process = self.children.pop(pid)
                code = os.waitstatus_to_exitcode(status)
                multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
                if self.stopping:
                    continue
                logger.error("worker %d (pid %d) exited with %d", index, pid, code)
                now = time.monotonic()
                deaths, window = CRASH_LOOP
                recent = self.deaths[index] = [*(t for t in self.deaths.get(index, []) if now - t < window), now]
                if len(recent) >= deaths:
                    logger.error("worker %d died %d times within %.0f s: stopping", index, deaths, window)
                    self.exit_code = 1
                    self.forward(signal.SIGTERM, None)
                else:
                    self.start(index)
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return self.exit_code
