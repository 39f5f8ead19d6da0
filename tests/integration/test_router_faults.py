"""Faults under a router in front of a real Ollama: a backend that stalls (SIGSTOP, the real process
frozen, not a fake) and a storm of 100 clients that drop mid-stream.

The Ollama here is private to this module: freezing it must not slow other tests, and the
storm's log lines must not mix with theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import OllamaServer, RouterServer, running_router, settled_chat_calls, start_ollama
from tests.support.procs import free_port, wait_until

pytestmark = pytest.mark.integration

MODEL = "gemma"


@pytest.fixture(scope="module")
def private_ollama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OllamaServer]:
    yield from start_ollama(tmp_path_factory.mktemp("ollama-faults"))


def gemma(ollama: OllamaServer, **overrides: object) -> list[dict[str, object]]:
    return [{"name": MODEL, "url": ollama.base_url, "upstream_model": ollama.model, **overrides}]


@contextmanager
def frozen(ollama: OllamaServer) -> Iterator[None]:
    """SIGSTOP Ollama and its model runner (one process group): connections are accepted, nothing answers."""
    group = ollama.process.process.pid
    os.killpg(group, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(group, signal.SIGCONT)


def metric(router: RouterServer, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(f"{router.base_url}/metrics", timeout=5).text.splitlines():
        named = line.startswith((f"{name}{{", f"{name} "))
        if named and all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


STORY = "Tell story number {} about a lighthouse keeper."


def chat(prompt: str, max_tokens: int, stream: bool = False) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "use_cache": False}  # fmt: skip


# A stalled backend ------------------------------------------------------------------------------


def test_a_stalled_backend_times_out_and_the_queue_behind_it_drains(
    private_ollama: OllamaServer, tmp_path: Path
) -> None:
    # Thawed, Ollama takes about 3 s to answer again (measured), so the timeout must exceed that for
    # the queued requests to succeed.
    timeout = 6.0
    models = gemma(private_ollama, max_in_flight=1, max_queue=8)
    with running_router(tmp_path, models, upstream_timeout_seconds=str(timeout)) as router:
        url = f"{router.openai_base_url}/chat/completions"
        assert httpx.post(url, json=chat("Say hi.", 4), timeout=60).status_code == 200  # loaded and warm
        results: list[tuple[int, str | None, float]] = []  # status, error code, seconds
        lock = threading.Lock()

        def call(index: int) -> None:
            started = time.monotonic()
            response = httpx.post(url, json=chat(f"Say hi to guest {index}.", 4), timeout=60)
            code = response.json()["error"]["code"] if response.status_code != 200 else None
            with lock:
                results.append((response.status_code, code, time.monotonic() - started))

        with frozen(private_ollama):
            threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
            for thread in threads:
                thread.start()
            # One request holds the slot at the stalled backend, two wait in the router's queue.
            wait_until(lambda: metric(router, "modelfleet_queue_depth") == 2, timeout=10, interval=0.05)
            wait_until(lambda: len(results) >= 1, timeout=timeout + 10, interval=0.05)
        for thread in threads:
            thread.join(60)

        first, *rest = results
        assert first[:2] == (504, "upstream_timeout")
        assert first[2] >= timeout, "the router gave up before its timeout"
        # Thawed, the backend answers the rest: the queue drained instead of timing out one by one.
        assert [status for status, _, _ in rest] == [200, 200]
        assert metric(router, "modelfleet_in_flight_requests") == 0
        assert metric(router, "modelfleet_queue_depth") == 0
        assert metric(router, "modelfleet_upstream_errors_total", code="upstream_timeout") == 1
        print(f"\nstalled backend: 504 after {first[2]:.2f} s (timeout {timeout} s); queued: {rest}")


def test_a_backend_that_stalls_mid_stream_ends_the_stream_with_an_error_event(
    private_ollama: OllamaServer, tmp_path: Path
) -> None:
    timeout = 2.0
    with running_router(tmp_path, gemma(private_ollama), upstream_timeout_seconds=str(timeout)) as router:
        body = chat("Tell a long story about a lighthouse keeper.", 300, stream=True)
        events: list[str] = []
        froze_at = 0.0
        error_after = None
        with (
            httpx.stream("POST", f"{router.openai_base_url}/chat/completions", json=body, timeout=60) as response,
        ):
            assert response.status_code == 200
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: {") and '"content"' in line:
                    break
            with frozen(private_ollama):
                froze_at = time.monotonic()
                for line in lines:
                    if not line.startswith("data: "):
                        continue
                    events.append(line.removeprefix("data: "))
                    if '"error"' in line and error_after is None:
                        error_after = time.monotonic() - froze_at
        assert error_after is not None, f"no error event: {events[-3:]}"
        error = json.loads(next(event for event in events if '"error"' in event))["error"]
        assert error["code"] == "upstream_timeout"
        assert events[-1] == "[DONE]"
        # The silence is timed from the backend's last chunk, which can precede the freeze a little;
        # upstream_timeout (above) says it was the timeout that ended it, so no upper bound is needed.
        assert timeout - 1 <= error_after
        assert metric(router, "modelfleet_in_flight_requests") == 0
        print(f"\nstalled mid-stream: error event {error_after:.2f} s after the freeze (timeout {timeout} s)")


# A disconnect storm ------------------------------------------------------------------------------


def router_sockets(router: RouterServer, backend_port: int) -> tuple[int, int, int]:
    """(client connections, backend connections, open fds) of the router process."""
    process = psutil.Process(router.process.process.pid)
    router_port = int(router.base_url.rsplit(":", 1)[1])
    established = [c for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_ESTABLISHED]
    clients = sum(1 for c in established if c.laddr.port == router_port)
    backends = sum(1 for c in established if c.raddr and c.raddr.port == backend_port)
    return clients, backends, process.num_fds()


async def storm(url: str, clients: int, slots: int, metrics_url: str) -> float:
    """Open `clients` streams, wait until every slot is taken and the rest queue, then drop them all at once.

    Ollama runs one generation at a time and sends its headers with the first token, so of the
    requests holding a slot one is streaming and the others still wait for the backend's headers:
    the drop hits streams in all three states (generating, waiting upstream, queued in the router).
    """
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients + 10)) as http:
        opened = 0

        async def one(index: int) -> None:
            nonlocal opened
            body = chat(STORY.format(index), 400, stream=True)
            async with http.stream("POST", url, json=body) as response:
                assert response.status_code == 200
                opened += 1
                async for _ in response.aiter_raw():
                    pass

        async def settled() -> bool:
            text = (await http.get(metrics_url)).text
            in_flight = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                            if line.startswith("modelfleet_in_flight_requests{"))  # fmt: skip
            return in_flight == slots and opened >= clients - slots + 1

        tasks = [asyncio.create_task(one(i)) for i in range(clients)]
        deadline = time.monotonic() + 60
        while not await settled():
            assert time.monotonic() < deadline, f"only {opened} of {clients} streams opened"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # tokens are flowing on the stream that is generating
        dropped_at = time.monotonic()
        for task in tasks:
            task.cancel()  # cancelling a read drops its connection
        results = await asyncio.gather(*tasks, return_exceptions=True)
        unexpected = [r for r in results if not isinstance(r, asyncio.CancelledError)]
        assert not unexpected, unexpected[:3]
        return dropped_at


def test_a_storm_of_100_disconnects_cancels_every_generation_and_leaks_nothing(
    private_ollama: OllamaServer, tmp_path: Path
) -> None:
    clients, slots = 100, 4
    backend_port = int(private_ollama.base_url.rsplit(":", 1)[1])
    models = gemma(private_ollama, max_in_flight=slots, max_queue=clients)
    with running_router(tmp_path, models) as router:
        url = f"{router.openai_base_url}/chat/completions"
        assert httpx.post(url, json=chat("Say hi.", 4), timeout=60).status_code == 200
        # The yardstick: Ollama's own time for 100 tokens of such a story, here and now.
        yardstick = private_ollama.generation_seconds(chat(STORY.format(0), 1)["messages"], 100)  # type: ignore[arg-type]
        calls_before = settled_chat_calls(private_ollama)
        tasks_before = metric(router, "modelfleet_event_loop_tasks")
        _, backends_before, fds_before = router_sockets(router, backend_port)

        storm_started = time.monotonic()
        dropped_at = asyncio.run(storm(url, clients, slots, f"{router.base_url}/metrics"))

        # Every slot and queue entry is given back at once.
        wait_until(
            lambda: (
                metric(router, "modelfleet_in_flight_requests") == 0 and metric(router, "modelfleet_queue_depth") == 0
            ),
            timeout=5,
            interval=0.05,
            on_timeout=lambda: "; ".join(
                f"{name} {metric(router, name)}" for name in ("modelfleet_in_flight_requests", "modelfleet_queue_depth")
            ),
        )
        freed_after = time.monotonic() - dropped_at
        assert metric(router, "modelfleet_requests_total", status_class="cancelled") == clients

        # Every generation that reached Ollama ended: its handler returned within 100 tokens' time of
        # the drop. One left running would go on to its 400 tokens: hundreds more after the drop.
        calls = settled_chat_calls(private_ollama) - calls_before
        durations = private_ollama.finished_chat_durations()[-calls:] if calls else []
        assert calls >= slots
        longest_allowed = dropped_at - storm_started + yardstick
        assert max(durations) < longest_allowed, (durations, f"100 tokens take {yardstick:.1f} s")

        # Nothing leaked: tasks, client and backend connections, file descriptors.
        wait_until(lambda: router_sockets(router, backend_port)[0] <= 1, timeout=5)  # 1: this scrape's own
        _, backends_after, fds_after = router_sockets(router, backend_port)
        tasks_after = metric(router, "modelfleet_event_loop_tasks")
        assert tasks_after <= tasks_before, (tasks_before, tasks_after)
        assert backends_after <= backends_before, (backends_before, backends_after)
        assert fds_after <= fds_before + 2, (fds_before, fds_after)

        # And the router still serves.
        assert httpx.post(url, json=chat("Say hi again.", 4), timeout=60).status_code == 200
        print(
            f"\nstorm: {clients} streams dropped, slots and queue free after {freed_after * 1000:.0f} ms, "
            f"{calls} generations reached Ollama and all ended (longest {max(durations):.2f} s), "
            f"tasks {tasks_before:.0f}->{tasks_after:.0f}, backend connections {backends_before}->{backends_after}, "
            f"fds {fds_before}->{fds_after}"
        )


async def leave_while_generating(url: str, body: dict[str, object], metrics_url: str) -> float:
    """Send a non-streamed request and drop its connection once the router has handed it to the backend;
    the time it left."""
    async with httpx.AsyncClient(timeout=120) as http:
        request = asyncio.create_task(http.post(url, json=body))
        deadline = time.monotonic() + 60
        while True:
            assert not request.done(), f"answered before the client could leave: {request.result()}"
            text = (await http.get(metrics_url)).text
            if any(line.startswith("modelfleet_in_flight_requests{") and not line.endswith(" 0.0")
                   for line in text.splitlines()):  # fmt: skip
                break
            assert time.monotonic() < deadline, "the request never reached the backend"
            await asyncio.sleep(0.05)
        # The router holds a slot: the request is on its way to Ollama. Give it a moment to arrive
        # there (if the generation ends meanwhile, the assertion above says so: never a silent pass).
        await asyncio.sleep(1.0)
        assert not request.done(), f"answered before the client could leave: {request.result()}"
        request.cancel()  # cancelling the awaited post drops its connection
        left_at = time.monotonic()
        with contextlib.suppress(asyncio.CancelledError):
            await request
        return left_at


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cacheable"])
def test_a_client_that_leaves_before_its_answer_cancels_the_generation(
    private_ollama: OllamaServer, tmp_path: Path, cached: bool
) -> None:
    """Not streamed: the handler is awaiting the backend, so only the disconnect can stop it.  A cacheable
    answer is computed in a task shared by identical requests; it stops when its last client leaves.

    The proof is Ollama's own: its access log ends a generation whose request was cancelled with a
    500 ("context canceled"), and one that ran to its end with a 200, however fast the machine is.
    """
    with running_router(tmp_path, gemma(private_ollama)) as router:
        url = f"{router.openai_base_url}/chat/completions"
        assert httpx.post(url, json=chat("Say hi.", 4), timeout=60).status_code == 200
        calls_before = settled_chat_calls(private_ollama)
        assert private_ollama.finished_chat_requests()[-1][0] == 200, "a generation that ends by itself logs 200"
        body = chat("Tell a long story about a lighthouse keeper.", 400)
        body["use_cache"] = cached
        left_at = asyncio.run(leave_while_generating(url, body, f"{router.base_url}/metrics"))
        wait_until(lambda: metric(router, "modelfleet_in_flight_requests") == 0, timeout=5, interval=0.05)
        freed_after = time.monotonic() - left_at
        wait_until(lambda: settled_chat_calls(private_ollama) == calls_before + 1, timeout=30)
        status, generation_seconds = private_ollama.finished_chat_requests()[-1]
        assert status == 500, f"Ollama's generation ran to its end ({status} after {generation_seconds} s)"
        assert metric(router, "modelfleet_requests_total", status_class="cancelled") == 1
        print(
            f"\nclient left while generating: slot free {freed_after * 1000:.0f} ms later, "
            f"Ollama's generation cancelled after {generation_seconds:.2f} s"
        )


# A replica that has just stopped -----------------------------------------------------------------


def test_a_replica_that_refuses_connections_costs_no_request(private_ollama: OllamaServer, tmp_path: Path) -> None:
    """A pod that stopped before the router saw its EndpointSlice change refuses the connection: the
    request never reached it, so the next replica takes it, streamed or not, and the client sees nothing."""
    stopped = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    models = gemma(private_ollama, url=stopped, replica_urls=[private_ollama.base_url])
    with running_router(tmp_path, models) as router:
        answers = []
        for stream in (False, True, False, True, False, True):
            body = chat("Say hi.", 4, stream=stream)
            response = httpx.post(f"{router.openai_base_url}/chat/completions", json=body, timeout=60)
            answers.append(response.status_code)
            if stream:
                assert '"error"' not in response.text, response.text[-500:]
        assert answers == [200] * 6
        # Idle replicas take turns, so half of these went to the stopped one first.
        assert metric(router, "modelfleet_upstream_errors_total", code="upstream_unavailable") == 0
