"""Replica choice with two real Ollama replicas, proved by each replica's own access log.

One router serves the same two replicas as two models: `affine` routes by prompt prefix,
`spread` by least load.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from modelfleet.server.routing import affinity_key, ranked
from tests.conftest import OllamaServer, RouterServer, expect_chat_calls, settled_chat_calls, start_ollama, start_router
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OllamaServer, OllamaServer]]:
    # Two requests at once each, as the operator sets OLLAMA_NUM_PARALLEL to maxInFlightPerReplica.
    for first in start_ollama(tmp_path_factory.mktemp("replica-a"), parallel=2):
        for second in start_ollama(tmp_path_factory.mktemp("replica-b"), parallel=2):
            yield first, second


@pytest.fixture(scope="module")
def router(
    replicas: tuple[OllamaServer, OllamaServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RouterServer]:
    first, second = replicas
    common = {"url": first.base_url, "replica_urls": [second.base_url], "upstream_model": first.model,
              "max_in_flight": 2, "cache_enabled": False}  # fmt: skip
    models: list[dict[str, object]] = [
        {"name": "affine", "routing": "prefix", **common},
        {"name": "spread", "routing": "leastLoaded", **common},
    ]
    yield from start_router(tmp_path_factory.mktemp("router"), models)


def opening(number: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a lighthouse keeper who answers in one short sentence."},
        {"role": "user", "content": f"Visitor {number} asks: what do you see tonight?"},
    ]


def home(messages: list[dict[str, str]], replicas: tuple[OllamaServer, OllamaServer]) -> OllamaServer:
    """The replica the router's rendezvous hashing ranks first for this conversation."""
    key = affinity_key({"messages": messages})
    assert key is not None
    first = ranked(key, [replica.base_url for replica in replicas])[0]
    return next(replica for replica in replicas if replica.base_url == first)


def converse(router: RouterServer, model: str, messages: list[dict[str, str]], turns: int) -> None:
    """`turns` requests of one growing conversation, one after another."""
    messages = list(messages)
    for turn in range(turns):
        body = {"model": model, "messages": messages, "max_tokens": 6, "temperature": 0}
        answer = httpx.post(f"{router.openai_base_url}/chat/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        messages += [answer.json()["choices"][0]["message"], {"role": "user", "content": f"And then ({turn})?"}]


def affinity_count(router: RouterServer, result: str) -> float:
    prefix = f'modelfleet_prefix_affinity_total{{model="affine",result="{result}"}} '
    for line in httpx.get(f"{router.base_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    return 0.0


def test_each_conversation_stays_on_its_prefixs_replica(
    router: RouterServer, replicas: tuple[OllamaServer, OllamaServer]
) -> None:
    # Two conversations whose prefixes have different home replicas.
    by_home: dict[str, list[dict[str, str]]] = {}
    number = 0
    while len(by_home) < 2:
        messages = opening(number)
        by_home.setdefault(home(messages, replicas).base_url, messages)
        number += 1
    hits = affinity_count(router, "hit")
    for home_url, messages in by_home.items():
        before = {replica.base_url: settled_chat_calls(replica) for replica in replicas}
        converse(router, "affine", messages, turns=3)
        # The conversation's home ran all three turns and the other replica none. Least-loaded
        # routing takes turns between idle replicas, so it would have split the conversation.
        for replica in replicas:
            expect_chat_calls(replica, before[replica.base_url] + (3 if replica.base_url == home_url else 0))
    assert affinity_count(router, "hit") - hits == 6
    assert affinity_count(router, "miss") == 0


def test_least_loaded_routing_splits_a_conversation(
    router: RouterServer, replicas: tuple[OllamaServer, OllamaServer]
) -> None:
    before = {replica.base_url: settled_chat_calls(replica) for replica in replicas}
    converse(router, "spread", opening(0), turns=4)
    for replica in replicas:
        expect_chat_calls(replica, before[replica.base_url] + 2)


def test_a_busy_home_spills_to_the_next_replica_above_the_load_bound(
    router: RouterServer, replicas: tuple[OllamaServer, OllamaServer]
) -> None:
    messages = opening(7)
    favourite = home(messages, replicas)
    other = next(replica for replica in replicas if replica is not favourite)
    before = {replica.base_url: settled_chat_calls(replica) for replica in replicas}
    hits, misses = affinity_count(router, "hit"), affinity_count(router, "miss")
    done = threading.Event()
    body = {"model": "affine", "messages": messages, "max_tokens": 400, "stream": True}

    def hold_a_stream() -> None:
        with httpx.stream("POST", f"{router.openai_base_url}/chat/completions", json=body, timeout=120) as response:
            for _ in response.iter_lines():
                if done.is_set():
                    break  # leaving closes the stream, which stops the generation

    clients = [threading.Thread(target=hold_a_stream) for _ in range(3)]
    try:
        for client in clients:
            client.start()
        # Three requests of one prefix outstanding at once on two replicas: the load limit is
        # ceil(1.25 x (outstanding + 1) / 2), so the home takes the first two and the third spills.
        wait_until(lambda: affinity_count(router, "hit") + affinity_count(router, "miss") - hits - misses == 3,
                   timeout=60)  # fmt: skip
    finally:
        done.set()
        for client in clients:
            client.join(timeout=120)
    assert (affinity_count(router, "hit") - hits, affinity_count(router, "miss") - misses) == (2, 1)
    expect_chat_calls(favourite, before[favourite.base_url] + 2)
    expect_chat_calls(other, before[other.base_url] + 1)
