"""What every section of `make bench` shares: the Go load generator and fake upstream, the router started
for a measurement, processes pinned to cores and their CPU time, and the figures' arithmetic.

run.py, peers.py, affinity.py and revisions.py import it; it imports none of them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "hack" / "bench"
BIN_DIR = REPO / ".cache" / "bench-bin"
PYTHON = sys.executable
LOOPBACK = "127.0.0.1"
CHAT = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}

Result = dict[str, Any]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def build_go_tools() -> None:
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(["go", "build", "-o", str(BIN_DIR) + "/", "./..."], cwd=BENCH_DIR, check=True)


def raise_file_limit() -> None:
    # 1,000 streams through the router hold 2,000 sockets; allow what the hard limit allows.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass(frozen=True)
class ProcStat:
    """What the benchmarks read from /proc/PID/stat: CPU time in clock ticks, own and reaped children's."""

    pid: int
    ppid: int
    user_ticks: int
    system_ticks: int
    children_user_ticks: int
    children_system_ticks: int


def parse_proc_stat(text: str) -> ProcStat:
    # The command name (field 2) is in parentheses and may hold spaces and ")": split after the last one.
    head, tail = text.rsplit(")", 1)
    fields = tail.split()  # fields[0] is field 3 (state) of proc(5)
    return ProcStat(
        pid=int(head.split("(", 1)[0]),
        ppid=int(fields[1]),
        user_ticks=int(fields[11]),
        system_ticks=int(fields[12]),
        children_user_ticks=int(fields[13]),
        children_system_ticks=int(fields[14]),
    )


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def rss_peak_mb(self) -> float:
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        stat = parse_proc_stat(Path(f"/proc/{self.popen.pid}/stat").read_text())
        return (stat.user_ticks + stat.system_ticks) / os.sysconf("SC_CLK_TCK")


def pinned_argv(argv: list[str], cpus: str | None) -> list[str]:
    """`argv` run on the CPUs listed (taskset's list, "1" or "0,2"); taskset execs it, so the PID is argv's."""
    return ["taskset", "--cpu-list", cpus, *argv] if cpus else argv


@contextlib.contextmanager
def running(
    name: str,
    argv: list[str],
    work: Path,
    ready: Callable[[], bool],
    env: dict[str, str] | None = None,
    timeout: float = 60,
    cpus: str | None = None,
) -> Iterator[Process]:
    log_path = work / f"{name}.log"
    with log_path.open("wb") as out:
        popen = subprocess.Popen(
            pinned_argv(argv, cpus),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=raise_file_limit,
        )
        process = Process(name, popen, log_path)
        try:
            deadline = time.monotonic() + timeout
            while True:
                with contextlib.suppress(Exception):
                    if ready():
                        break
                if popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.05)
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(timeout=5)


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


@contextlib.contextmanager
def upstream(work: Path, chunks: int = 20, interval: str = "50ms", cpus: str | None = None) -> Iterator[str]:
    port = free_port()
    argv = [str(BIN_DIR / "upstream"), "-addr", f"{LOOPBACK}:{port}", "-chunks", str(chunks), "-interval", interval]
    base = f"http://{LOOPBACK}:{port}"
    with running(f"upstream-{chunks}", argv, work, lambda: http_ok(f"{base}/v1/models"), cpus=cpus):
        yield base


@contextlib.contextmanager
def router(
    work: Path, upstream_url: str, upstream_model: str = "bench", model_settings: dict[str, Any] | None = None,
    cpus: str | None = None, source: Path | None = None, **settings: str,
) -> Iterator[tuple[str, Process]]:  # fmt: skip
    """The router on a free loopback port; `source`: run another tree's `server/` (hack.bench.revisions)."""
    port = free_port()
    model = {
        "name": "bench",
        "url": upstream_url,
        "upstream_model": upstream_model,
        "max_in_flight": 4096,
        "max_queue": 4096,
        **(model_settings or {}),
    }
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work),
        "MODELFLEET_HOST": LOOPBACK,
        "MODELFLEET_PORT": str(port),
        "MODELFLEET_MODELS": json.dumps([model]),
        "MODELFLEET_AUTH_REQUIRED": "false",
        "MODELFLEET_RATE_LIMIT_REQUESTS_PER_MINUTE": "0",
        **{f"MODELFLEET_{key.upper()}": value for key, value in settings.items()},
        **({"PYTHONPATH": str(source)} if source is not None else {}),
    }
    base = f"http://{LOOPBACK}:{port}"
    with running(
        f"router-{uuid.uuid4().hex[:6]}",
        [PYTHON, "-m", "modelfleet.server"],
        work,
        lambda: http_ok(f"{base}/readyz"),
        env=env,
        cpus=cpus,
    ) as process:
        yield base, process


def loadgen(url: str, *args: str, body: dict[str, Any] | None = None, cpus: str | None = None) -> Result:
    argv = [str(BIN_DIR / "loadgen"), "-url", url, "-body", json.dumps(body or CHAT), *args]
    completed = subprocess.run(
        pinned_argv(argv, cpus), capture_output=True, text=True, check=True, timeout=900,
        preexec_fn=raise_file_limit,
    )  # fmt: skip
    result: Result = json.loads(completed.stdout)
    return result


def median_of(runs: list[Result], *path: str) -> float:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value[key]
        values.append(float(value))
    return statistics.median(values)


# 1. Router overhead ------------------------------------------------------------------------


# ggml's threads busy-wait: with two threads on two cores, any other work (the client, the router)
# preempts one of them and generation speed flips between ~20 and ~45 tokens/s from run to run,
# whichever side is being measured. One thread leaves a core for the client and the router, so
# the comparison measures the router rather than the scheduler.
BENCH_MODEL = "gemma3-bench"


def p90(values: list[float]) -> float:
    return sorted(values)[max(0, math.ceil(0.9 * len(values)) - 1)]
