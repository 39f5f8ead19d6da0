"""The router with Redis: a cache and limits shared by replicas, and Redis failing under it."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    OllamaServer,
    RouterServer,
    expect_chat_calls,
    redis_process,
    running_router,
    settled_chat_calls,
)
from tests.support.procs import LOOPBACK, free_port, wait_until

pytestmark = pytest.mark.integration

PINNED = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6, "temperature": 0}


def ask(router: RouterServer, content: str = "Name a colour.") -> httpx.Response:
    body = {"model": "gemma3:270m", **PINNED, "messages": [{"role": "user", "content": content}]}
    return httpx.post(f"{router.openai_base_url}/chat/completions", json=body, timeout=60)


def redis_health(router: RouterServer) -> bool:
    redis: dict[str, bool] = httpx.get(f"{router.base_url}/health", timeout=5).json()["redis"]
    return redis["available"]


def metric(router: RouterServer, line_start: str) -> float:
    for line in httpx.get(f"{router.base_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {line_start}")


@contextlib.contextmanager
def two_routers(ollama: OllamaServer, work_dir: Path, redis_url: str, **settings: str) -> Iterator[list[RouterServer]]:
    models: list[dict[str, object]] = [{"name": ollama.model, "url": ollama.base_url}]
    with contextlib.ExitStack() as stack:
        routers = [
            stack.enter_context(running_router(work_dir / name, models, redis_url=redis_url, **settings))
            for name in ("a", "b")
        ]
        yield routers


def test_replicas_share_the_cache_and_the_limits(ollama_server: OllamaServer, tmp_path: Path) -> None:
    port = free_port()
    with (
        redis_process(tmp_path / "redis", port),
        two_routers(ollama_server, tmp_path, f"redis://{LOOPBACK}:{port}/0", rate_limit_requests_per_minute="3") as (
            a,
            b,
        ),
    ):
        calls = settled_chat_calls(ollama_server)
        first = ask(a)
        assert first.headers["x-modelfleet-cache"] == "miss"
        second = ask(b)
        assert second.headers["x-modelfleet-cache"] == "hit", "router b reads what router a stored"
        assert second.json()["choices"] == first.json()["choices"]
        expect_chat_calls(ollama_server, calls + 1)
        # Three requests per minute for this client, whichever replica it reaches.
        assert ask(a, "Another.").status_code == 200
        refused = ask(b, "And another.")
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_requests"
        assert httpx.get(f"{a.base_url}/health", timeout=5).json()["cache"]["backend"] == "redis"


def test_redis_killed_and_restarted(ollama_server: OllamaServer, tmp_path: Path) -> None:
    """Fail open: with Redis gone every request still succeeds, uncached; once it is back, caching resumes."""
    port = free_port()
    redis_url = f"redis://{LOOPBACK}:{port}/0"
    models: list[dict[str, object]] = [{"name": ollama_server.model, "url": ollama_server.base_url}]
    with running_router(
        tmp_path / "router",
        models,
        redis_url=redis_url,
        rate_limit_requests_per_minute="50",
        rate_limit_failure_mode="open",
    ) as router:
        with redis_process(tmp_path / "redis", port):
            wait_until(lambda: redis_health(router), timeout=10)
            assert ask(router).headers["x-modelfleet-cache"] == "miss"
            assert ask(router).headers["x-modelfleet-cache"] == "hit"
            assert metric(router, "modelfleet_redis_up") == 1
        # Redis is gone now (the block stopped it).
        calls = settled_chat_calls(ollama_server)
        during = [ask(router) for _ in range(4)]
        assert [r.status_code for r in during] == [200] * 4
        assert {r.headers["x-modelfleet-cache"] for r in during} == {"bypass"}
        expect_chat_calls(ollama_server, calls + 4)  # bypassed: every request reached the backend
        wait_until(lambda: not redis_health(router), timeout=5)
        assert metric(router, "modelfleet_redis_up") == 0
        assert metric(router, "modelfleet_cache_errors_total") >= 1

        with redis_process(tmp_path / "redis-again", port):
            wait_until(lambda: redis_health(router), timeout=10)
            assert metric(router, "modelfleet_redis_up") == 1
            assert ask(router, "Back again.").headers["x-modelfleet-cache"] == "miss"
            assert ask(router, "Back again.").headers["x-modelfleet-cache"] == "hit"


def test_fail_closed_refuses_while_redis_is_down(ollama_server: OllamaServer, tmp_path: Path) -> None:
    port = free_port()
    models: list[dict[str, object]] = [{"name": ollama_server.model, "url": ollama_server.base_url}]
    with running_router(
        tmp_path / "router",
        models,
        redis_url=f"redis://{LOOPBACK}:{port}/0",
        rate_limit_requests_per_minute="50",
        rate_limit_failure_mode="closed",
    ) as router:
        refused = ask(router)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "rate_limiter_unavailable"
        assert refused.headers["retry-after"] == "1"
        with redis_process(tmp_path / "redis", port):
            wait_until(lambda: ask(router).status_code == 200, timeout=10)


def test_redis_sigkilled_under_load_costs_no_request(ollama_server: OllamaServer, tmp_path: Path) -> None:
    """Eight clients in a loop while Redis is SIGKILLed and later started again: every request succeeds
    (fail open), hits turn into bypasses while Redis is gone and come back by themselves."""
    port = free_port()
    redis_url = f"redis://{LOOPBACK}:{port}/0"
    models: list[dict[str, object]] = [{"name": ollama_server.model, "url": ollama_server.base_url}]
    results: list[tuple[str, int, str, float]] = []  # phase, status, cache header, seconds
    phase = "before"
    stop = threading.Event()

    def seen(name: str, outcome: str, at_least: int = 1) -> bool:
        return sum(1 for r in list(results) if r[0] == name and f"{r[1]} {r[2]}" == outcome) >= at_least

    def client(router: RouterServer) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                started = time.monotonic()
                body = {"model": ollama_server.model, **PINNED}
                response = http.post(f"{router.openai_base_url}/chat/completions", json=body)
                results.append((phase, response.status_code, response.headers.get("x-modelfleet-cache", ""),
                                time.monotonic() - started))  # fmt: skip

    with running_router(
        tmp_path / "router", models, redis_url=redis_url, rate_limit_requests_per_minute="100000",
        rate_limit_failure_mode="open",
    ) as router:  # fmt: skip
        with redis_process(tmp_path / "redis", port) as redis:
            wait_until(lambda: redis_health(router), timeout=10)
            assert ask(router).status_code == 200  # cached from here on
            threads = [threading.Thread(target=client, args=(router,)) for _ in range(8)]
            for thread in threads:
                thread.start()
            # Each phase lasts until it has shown what it is for; the bounds are only for a hang.
            wait_until(lambda: seen("before", "200 hit"), timeout=60)
            phase = "down"
            redis.process.kill()
            redis.process.wait(timeout=5)
            wait_until(lambda: seen("down", "200 bypass", at_least=8), timeout=120)
        with redis_process(tmp_path / "redis-again", port):
            phase = "restarted"
            wait_until(lambda: redis_health(router), timeout=10)
            phase = "recovered"
            wait_until(lambda: seen("recovered", "200 hit", at_least=8), timeout=120)
            stop.set()
            for thread in threads:
                thread.join(60)
    by_phase: dict[str, Counter[str]] = defaultdict(Counter)
    for name, status, cache, _ in results:
        by_phase[name][f"{status} {cache}"] += 1
    failed = [r for r in results if r[1] != 200]
    assert not failed, f"{len(failed)} requests failed: {failed[:3]}"
    assert by_phase["before"]["200 hit"] > 0
    assert by_phase["down"]["200 bypass"] > 0, by_phase["down"]
    assert by_phase["recovered"]["200 hit"] > 0, by_phase["recovered"]
    slowest_down = max(seconds for name, _, _, seconds in results if name == "down")
    print(f"\nRedis SIGKILLed under 8 clients: {len(results)} requests, 0 failed; {dict(by_phase)}; "
          f"slowest while down {slowest_down:.2f} s")  # fmt: skip
