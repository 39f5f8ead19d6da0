"""Start real local servers for tests: free loopback ports, readiness waits, clean stops."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def tcp_accepts(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


class ServiceFailedToStart(RuntimeError):
    """A fixture's server did not come up; the message says why and where its log is."""


@dataclass
class RunningProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever outlives the grace period."""
        if self.process.poll() is not None:
            # The leader is gone (a test may have killed it), but its children (Ollama's model
            # runner) share its group and would outlive the test.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    interval: float = 0.1,
    on_timeout: Callable[[], str] | None = None,
    running: RunningProcess | None = None,
) -> None:
    """Poll `condition` until it holds; fail early if `running` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if condition():
                return
        if running is not None and running.process.poll() is not None:
            raise ServiceFailedToStart(
                f"{running.name} exited with code {running.process.returncode} before it was ready; "
                f"last log lines ({running.log_path}):\n{running.log_tail()}"
            )
        if time.monotonic() > deadline:
            detail = on_timeout() if on_timeout else ""
            raise TimeoutError(f"condition not met within {timeout:.0f}s {detail}".strip())
        time.sleep(interval)


@contextlib.contextmanager
def running_process(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    ready: Callable[[], bool],
    ready_timeout: float = 30.0,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[RunningProcess]:
    """Run `argv` in its own process group until the block exits; yield once `ready()` holds."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log_file:
        try:
            process = subprocess.Popen(
                list(argv),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise ServiceFailedToStart(f"{name}: executable {argv[0]!r} not found ({exc})") from exc
        handle = RunningProcess(name=name, process=process, log_path=log_path)
        try:
            try:
                wait_until(ready, ready_timeout, running=handle)
            except TimeoutError as exc:
                raise ServiceFailedToStart(
                    f"{name} was not ready within {ready_timeout:.0f}s; last log lines ({log_path}):\n"
                    f"{handle.log_tail()}"
                ) from exc
            yield handle
        finally:
            handle.stop()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60, interval: float = 0.25) -> None:
    """`wait_until` with an error that names what the test was waiting for."""
    started = time.monotonic()
    try:
        wait_until(condition, timeout=timeout, interval=interval)
    except TimeoutError:
        raise AssertionError(f"timed out after {time.monotonic() - started:.0f}s waiting for {what}") from None
