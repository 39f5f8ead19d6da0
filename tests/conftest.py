"""Fixtures for real local services: Redis, Prometheus and Ollama on free 127.0.0.1 ports.

Each fixture starts its own server in a temporary directory and stops it afterwards,
so tests never touch a service that the machine (or the user) runs already.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from hack import ollama_model
from tests.support.markers import DESELECTED_ITEMS, KIND_COUNTS, refuse_tests_without_their_kind

# The marker plugin's hooks, re-exported so that pytest finds them in this conftest.
from tests.support.markers import pytest_addoption as pytest_addoption
from tests.support.markers import pytest_collection_finish as pytest_collection_finish
from tests.support.markers import pytest_deselected as pytest_deselected
from tests.support.markers import pytest_sessionfinish as pytest_sessionfinish
from tests.support.procs import LOOPBACK, RunningProcess, free_port, running_process, wait_until
from tests.support.sockets import connections_closed_by_clients, tcp_states

HARNESS_ITEMS = pytest.StashKey[set[str]]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    refuse_tests_without_their_kind(config, items)
    config.stash[HARNESS_ITEMS] = {item.nodeid for item in items if item.get_closest_marker("harness")}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Checks of the test environment itself are counted apart: they pass whatever ModelFleet does."""
    harness = config.stash.get(HARNESS_ITEMS, set())
    counts: dict[bool, dict[str, int]] = {True: {}, False: {}}
    for outcome in ("passed", "failed", "error", "skipped", "xfailed"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", "call") not in ("call", "setup") or not hasattr(report, "nodeid"):
                continue
            if outcome == "passed" and report.when != "call":
                continue
            group = counts[report.nodeid in harness]
            group[outcome] = group.get(outcome, 0) + 1

    def said(group: dict[str, int]) -> str:
        return ", ".join(f"{n} {outcome}" for outcome, n in group.items()) or "none run"

    terminalreporter.write_sep("-", "ModelFleet tests and harness checks")
    selected = config.stash.get(KIND_COUNTS, {})
    terminalreporter.write_line(
        "selected by kind: " + (", ".join(f"{n} {kind}" for kind, n in selected.items()) or "none")
    )
    deselected = config.stash.get(DESELECTED_ITEMS, [])
    terminalreporter.write_line(f"deselected: {len(deselected)}")
    if deselected and config.getoption("--fail-on-deselected"):
        terminalreporter.write_line("error: --fail-on-deselected, and these tests were deselected:", red=True)
        for nodeid in deselected:
            terminalreporter.write_line(f"  {nodeid}")
    terminalreporter.write_line(f"tests of ModelFleet: {said(counts[False])}")
    terminalreporter.write_line(f"harness checks (Redis, Prometheus, promtool, kwok, the real node, Ollama): "
                                f"{said(counts[True])}")  # fmt: skip


def require_binary(name: str, install_hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; {install_hint}", pytrace=False)
    return path


@dataclass
class RedisServer:
    host: str
    port: int
    process: RunningProcess
    data_dir: Path

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


def redis_answers_ping(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


@contextlib.contextmanager
def redis_process(data_dir: Path, port: int) -> Iterator[RunningProcess]:
    """redis-server on 127.0.0.1:`port` with no persistence, until the block ends (restartable on the same port)."""
    binary = require_binary("redis-server", "run `make install` (Debian package redis-server)")
    argv = [
        binary,
        "--bind", LOOPBACK,
        "--port", str(port),
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "yes",
        "--daemonize", "no",
    ]  # fmt: skip
    with running_process("redis", argv, data_dir, ready=lambda: redis_answers_ping(port)) as process:
        yield process


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, with no persistence; stopped afterwards."""
    data_dir = tmp_path_factory.mktemp("redis")
    port = free_port()
    with redis_process(data_dir, port) as process:
        yield RedisServer(host=LOOPBACK, port=port, process=process, data_dir=data_dir)


@dataclass
class PrometheusServer:
    port: int
    process: RunningProcess
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def reload(self) -> None:
        """Re-read the config file (the server runs with --web.enable-lifecycle)."""
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as response:
        status: int = response.status
        return status == 200


@pytest.fixture
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """A real Prometheus on a free loopback port that scrapes itself every second.

    Tests add scrape targets by rewriting `config_path` and calling `reload()`.
    """
    binary = require_binary("prometheus", "run `make install` (Debian package prometheus)")
    work_dir = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config_path = work_dir / "prometheus.yml"
    config_path.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: prometheus\n"
        "    static_configs:\n"
        f"      - targets: ['{LOOPBACK}:{port}']\n"
    )
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={work_dir / 'data'}",
        f"--web.listen-address={LOOPBACK}:{port}",
        "--web.enable-lifecycle",
        "--storage.tsdb.retention.time=1h",
    ]
    with running_process(
        "prometheus", argv, work_dir, ready=lambda: http_ok(f"http://{LOOPBACK}:{port}/-/ready"), ready_timeout=60
    ) as process:
        yield PrometheusServer(port=port, process=process, config_path=config_path)


GO_DURATION_PART = re.compile(r"([0-9.]+)(h|ms|m|s|µs|ns)")
GO_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "µs": 1e-6, "ns": 1e-9}


def go_duration_seconds(text: str) -> float:
    """A Go time.Duration as Go prints it (GIN's access log): "126.5µs", "13.4s", "4m9s", "1h2m3.5s"."""
    parts = GO_DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(number) * GO_DURATION_UNITS[unit] for number, unit in parts)


@dataclass
class OllamaServer:
    base_url: str
    model: str
    models_dir: Path
    process: RunningProcess

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    def finished_chat_requests(self) -> list[tuple[int, float]]:
        """(status, seconds) of each /v1/chat/completions request Ollama has finished, from its access log.

        Each backend call adds one line when its handler returns, so the count proves how many
        generations ran. The status says how each ended: a non-streamed generation whose client
        went away ends with "context canceled", which Ollama answers (to nobody) with a 500; one
        that ran to its end answers 200.
        """
        finished = []
        for line in self.process.log_path.read_text(errors="replace").splitlines():
            if line.startswith("[GIN]") and '"/v1/chat/completions"' in line:
                match = re.search(r"\|\s*(\d{3})\s*\|\s*(\S+)\s*\|", line)
                if match:
                    finished.append((int(match.group(1)), go_duration_seconds(match.group(2))))
        return finished

    def generation_seconds(self, messages: list[dict[str, str]], tokens: int) -> float:
        """Ollama's own wall time for a chat of exactly `tokens` generated tokens, on this machine now.

        A yardstick measured in the same run, so that "stopped early" needs no guess about how fast
        the machine is.
        """
        body = {"model": self.model, "messages": messages, "stream": False,
                "options": {"num_predict": tokens, "temperature": 0}}  # fmt: skip
        request = urllib.request.Request(
            f"{self.base_url}/api/chat", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.load(response)
        assert answer["eval_count"] == tokens, f"the prompt ended after {answer['eval_count']} of {tokens} tokens"
        return float(answer["total_duration"]) / 1e9

    def finished_chat_durations(self) -> list[float]:
        """Durations of the /v1/chat/completions requests Ollama has finished (see finished_chat_requests)."""
        return [seconds for _, seconds in self.finished_chat_requests()]


def ollama_finished_every_request(ollama: OllamaServer) -> bool:
    """Every request Ollama was sent has ended, and its access-log line (which GIN writes as the handler
    returns) is in the log.

    A client that read a whole answer was sent its last bytes after the handler had returned (Go's
    server writes them as the handler ends), so its line is written. A client that stopped reading and
    closed its end first (the router closes a stream at its `[DONE]`, before the final chunk; a client
    that leaves) leaves Ollama's side of the connection in CLOSE_WAIT, which Go closes only after that
    request's handler has returned. So: no connection of Ollama's in CLOSE_WAIT.
    """
    return connections_closed_by_clients(ollama_port(ollama)) == 0


def ollama_port(ollama: OllamaServer) -> int:
    port = urllib.parse.urlsplit(ollama.base_url).port
    assert port is not None
    return port


def ollama_connections(ollama: OllamaServer) -> list[str]:
    """The states of Ollama's listener and connections, for a failure's message."""
    return tcp_states(ollama_port(ollama))


def expect_chat_calls(ollama: OllamaServer, expected: int) -> None:
    """Ollama has finished exactly `expected` chat requests in all.

    Its log line for a request can come just after the client got its answer, so wait for the count to
    reach `expected` and for every request sent to it to have ended and been logged (see
    ollama_finished_every_request): an extra call would be among them.
    """
    wait_until(
        lambda: len(ollama.finished_chat_durations()) >= expected and ollama_finished_every_request(ollama),
        timeout=10,
        on_timeout=lambda: (
            f"(Ollama has logged {len(ollama.finished_chat_durations())} chat requests, expected {expected})"
        ),
    )
    assert len(ollama.finished_chat_durations()) == expected


def settled_chat_calls(ollama: OllamaServer) -> int:
    """The count of finished chat requests once no late log line has arrived for 0.3 s (a baseline).

    Not the wait of `expect_chat_calls` (no connection of Ollama's left in CLOSE_WAIT): after a storm of
    dropped clients, a request cancelled while it waited in Ollama's own scheduler can keep its handler,
    and so its connection, for minutes (seen in CI), and a baseline must not wait for it."""
    count = len(ollama.finished_chat_durations())
    while True:
        time.sleep(0.3)
        latest = len(ollama.finished_chat_durations())
        if latest == count:
            return count
        count = latest


def start_ollama(work_dir: Path, parallel: int | None = None, debug: bool = False) -> Iterator[OllamaServer]:
    """Our Ollama build serving gemma3:270m on a free loopback port, with a private models dir
    (and OLLAMA_NUM_PARALLEL `parallel`, as the operator sets it to maxInFlightPerReplica; `debug` logs
    each chat request's prompt as its handler starts it)."""
    try:
        binary = ollama_model.ollama_binary()
        store = ollama_model.prepare()
    except ollama_model.ModelSetupError as exc:
        pytest.fail(f"cannot start Ollama: {exc}", pytrace=False)
    models_dir = ollama_model.link_copy(store, work_dir / "models")
    port = free_port()
    home = work_dir / "home"
    home.mkdir()
    base_url = f"http://{LOOPBACK}:{port}"
    with running_process(
        "ollama",
        [str(binary), "serve"],
        work_dir,
        ready=lambda: http_ok(f"{base_url}/api/version"),
        ready_timeout=60,
        env=ollama_model.server_env(models_dir, port, home, parallel, debug),
        cwd=work_dir,
    ) as process:
        yield OllamaServer(base_url=base_url, model=ollama_model.MODEL_NAME, models_dir=models_dir, process=process)


@pytest.fixture(scope="session")
def ollama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OllamaServer]:
    """`ollama serve` (built by `make tools`) with Gemma 3 270M as gemma3:270m; stopped after the session."""
    yield from start_ollama(tmp_path_factory.mktemp("ollama"))


@dataclass
class RouterServer:
    base_url: str
    process: RunningProcess

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"


def start_router(work_dir: Path, models: list[dict[str, object]], **settings: str) -> Iterator[RouterServer]:
    """`python -m modelfleet.server` on a free loopback port, configured only through its environment."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work_dir),
        "MODELFLEET_HOST": LOOPBACK,
        "MODELFLEET_PORT": str(port),
        "MODELFLEET_MODELS": json.dumps(models),
        # Tests opt in to auth and limits; the router's own defaults are secure (keys required, 100/min).
        "MODELFLEET_AUTH_REQUIRED": "false",
        "MODELFLEET_RATE_LIMIT_REQUESTS_PER_MINUTE": "0",
        **{f"MODELFLEET_{key.upper()}": value for key, value in settings.items()},
    }
    base_url = f"http://{LOOPBACK}:{port}"
    with running_process(
        "router", [sys.executable, "-m", "modelfleet.server"], work_dir,
        ready=lambda: http_ok(f"{base_url}/readyz"), ready_timeout=30, env=env,
    ) as process:  # fmt: skip
        yield RouterServer(base_url=base_url, process=process)


running_router = contextlib.contextmanager(start_router)


@pytest.fixture(scope="session")
def router_server(ollama_server: OllamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterServer]:
    """The router in front of the real Ollama (OpenAI-compatible API), with the alias `gemma`."""
    models: list[dict[str, object]] = [
        {"name": ollama_server.model, "url": ollama_server.base_url, "aliases": ["gemma"]}
    ]
    yield from start_router(tmp_path_factory.mktemp("router"), models, max_tokens_cap="512")


def hashed_key(name: str, key: str, **options: object) -> dict[str, object]:
    """An entry of the router's keys file that stores `key` as its SHA-256, as operators should."""
    return {"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(), **options}


def write_keys_file(work_dir: Path, *entries: dict[str, object]) -> Path:
    """`keys.yaml` for MODELFLEET_API_KEYS_FILE, in `work_dir`."""
    path = work_dir / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": list(entries)}))
    return path
