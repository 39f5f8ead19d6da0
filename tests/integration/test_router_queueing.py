"""Per-model queueing in front of the real Ollama: slots, a bounded queue, 429, gauges, disconnects."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import OllamaServer, RouterServer, hashed_key, running_router, start_router, write_keys_file
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration

LONG = {
    "model": "gemma3:270m",
    "messages": [{"role": "user", "content": "Tell a long story about a lighthouse keeper."}],
    "stream": True,
    "max_tokens": 120,
    "temperature": 0,
}


@pytest.fixture
def narrow_router(ollama_server: OllamaServer, tmp_path: Path) -> Iterator[RouterServer]:
    """A router that lets one request run and two wait."""
    models: list[dict[str, object]] = [
        {"name": ollama_server.model, "url": ollama_server.base_url, "max_in_flight": 1, "max_queue": 2}
    ]
    yield from start_router(tmp_path, models)


def gauge(router: RouterServer, name: str) -> float:
    text = httpx.get(f"{router.base_url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="gemma3:270m"'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_one_runs_two_queue_one_is_refused_and_the_gauges_agree(narrow_router: RouterServer) -> None:
    results: dict[int, tuple[int, str]] = {}

    def stream(index: int) -> None:
        with httpx.stream("POST", f"{narrow_router.openai_base_url}/chat/completions", json=LONG, timeout=120) as r:
            results[index] = (r.status_code, r.read().decode())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    wait_until(lambda: gauge(narrow_router, "modelfleet_queue_depth") == 2, timeout=30, interval=0.05)
    assert gauge(narrow_router, "modelfleet_in_flight_requests") == 1

    refused = httpx.post(f"{narrow_router.openai_base_url}/chat/completions", json=LONG, timeout=30)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"

    for thread in threads:
        thread.join(timeout=120)
    assert sorted(status for status, _ in results.values()) == [200, 200, 200]
    assert all(body.rstrip().endswith("data: [DONE]") for _, body in results.values())
    assert gauge(narrow_router, "modelfleet_queue_depth") == 0
    assert gauge(narrow_router, "modelfleet_in_flight_requests") == 0
    metrics = httpx.get(f"{narrow_router.base_url}/metrics", timeout=5).text
    assert 'modelfleet_rejected_requests_total{model="gemma3:270m",reason="queue_full"} 1.0' in metrics
    assert (
        'modelfleet_requests_total{model="gemma3:270m",route="/v1/chat/completions",status_class="4xx"} 1.0' in metrics
    )


def test_a_client_that_disconnects_frees_its_slot_and_stops_the_generation(
    narrow_router: RouterServer, ollama_server: OllamaServer
) -> None:
    # The yardstick: how long Ollama takes, here and now, for this prompt and 100 tokens. Left
    # running, the request below would generate hundreds (the base model tells this story to the
    # length limit), so a generation that ends within the yardstick was stopped by the disconnect.
    yardstick = ollama_server.generation_seconds(LONG["messages"], 100)  # type: ignore[arg-type]
    body = {**LONG, "max_tokens": 2000}
    finished_before = len(ollama_server.finished_chat_durations())
    with httpx.stream("POST", f"{narrow_router.openai_base_url}/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(4)]
        assert any(line.startswith("data: ") for line in received)
        assert gauge(narrow_router, "modelfleet_in_flight_requests") == 1
        left_at = time.monotonic()
    # Leaving the block closed the connection mid-stream: the slot comes back.
    wait_until(lambda: gauge(narrow_router, "modelfleet_in_flight_requests") == 0, timeout=30, interval=0.02)
    freed_after = time.monotonic() - left_at
    # Ollama's handler for that request ended long before 2000 tokens, within the 100-token yardstick.
    wait_until(lambda: len(ollama_server.finished_chat_durations()) > finished_before, timeout=60, interval=0.1)
    generation = ollama_server.finished_chat_durations()[finished_before]
    assert generation < yardstick, f"the generation ran {generation:.1f} s, longer than 100 tokens ({yardstick:.1f} s)"
    # The slot is free for the next client straight away (max_in_flight is 1).
    quick = httpx.post(f"{narrow_router.openai_base_url}/chat/completions",
                       json={**LONG, "stream": False, "max_tokens": 4}, timeout=60)  # fmt: skip
    assert quick.status_code == 200
    metrics = httpx.get(f"{narrow_router.base_url}/metrics", timeout=5).text
    assert 'status_class="cancelled"' in metrics
    print(f"\nslot free {1000 * freed_after:.0f} ms after the client left; generation stopped after "
          f"{generation:.2f} s (100 tokens take {yardstick:.2f} s)")  # fmt: skip


def test_a_light_key_is_served_next_while_another_floods(ollama_server: OllamaServer, tmp_path: Path) -> None:
    """One slot; key `flood` has 5 requests in line when key `light` sends one.  Fair queueing starts
    `light` next, where a FIFO would have made it wait for all five.  With one slot, requests end in
    the order they start."""
    keys = write_keys_file(tmp_path, hashed_key("flood", "mf-flood"), hashed_key("light", "mf-light"))
    models: list[dict[str, object]] = [
        {"name": ollama_server.model, "url": ollama_server.base_url, "max_in_flight": 1, "max_queue": 16}
    ]
    finished: list[str] = []
    lock = threading.Lock()

    def ask(key: str, label: str) -> None:
        body = {**LONG, "stream": False, "max_tokens": 24, "use_cache": False}
        answer = httpx.post(f"{router.openai_base_url}/chat/completions", json=body,
                            headers={"authorization": f"Bearer {key}"}, timeout=300)  # fmt: skip
        assert answer.status_code == 200, answer.text
        with lock:
            finished.append(label)

    with running_router(tmp_path, models, auth_required="true", api_keys_file=str(keys)) as router:
        flood = [threading.Thread(target=ask, args=("mf-flood", f"flood-{i}")) for i in range(6)]
        for thread in flood:
            thread.start()
        # Event, not clock: one runs and five wait before the light key arrives.
        wait_until(lambda: gauge(router, "modelfleet_queue_depth") == 5, timeout=60, interval=0.05)
        light = threading.Thread(target=ask, args=("mf-light", "light"))
        light.start()
        wait_until(lambda: gauge(router, "modelfleet_queue_depth") == 6, timeout=30, interval=0.05)
        for thread in [*flood, light]:
            thread.join(timeout=300)
    assert len(finished) == 7, finished
    # The one running when it arrived, then light.
    assert finished.index("light") == 1, f"the light key waited behind the flood: {finished}"
