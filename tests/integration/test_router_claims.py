"""Claims of docs/router.md that no other test proved: fair queueing by key weight and priority, the token
budget's refunds, Ollama's native fields, Retry-After from recent durations, the per-key cache and the
Redis cache's memory bound. Real Ollama, real redis-server, the real router process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import math
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio

from modelfleet.server.cache import RedisCircuit, RedisStore, ResponseCache
from modelfleet.server.metrics import RouterMetrics
from tests.conftest import (
    OllamaServer,
    RedisServer,
    RouterServer,
    expect_chat_calls,
    hashed_key,
    running_router,
    settled_chat_calls,
    start_ollama,
    write_keys_file,
)
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART_REDIS_TEMPLATE = REPO / "charts/modelfleet/templates/redis/redis.yaml"


def metric_value(router: RouterServer, name: str, **labels: str) -> float:
    """One sample of the router's /metrics (0 when the series does not exist yet)."""
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    for line in httpx.get(f"{router.base_url}/metrics", timeout=5).text.splitlines():
        if not line.startswith(name + "{"):
            continue
        label_text = line[len(name) + 1 : line.index("}")]
        if wanted <= set(label_text.split(",")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def queue_depth(router: RouterServer, model: str) -> float:
    return metric_value(router, "modelfleet_queue_depth", model=model)


def depth_reaches(router: RouterServer, model: str, depth: int) -> Callable[[], bool]:
    """A condition for wait_until: `depth` requests wait in the model's queue."""
    return lambda: queue_depth(router, model) == depth


def in_flight(router: RouterServer, model: str) -> float:
    return metric_value(router, "modelfleet_in_flight_requests", model=model)


class HeldStream:
    """A streaming chat request held open until its holder lets it go."""

    def __init__(self) -> None:
        self.opened = threading.Event()  # the router answered with its status (a queued stream gets 200 at once)
        self.first_chunk = threading.Event()  # a data chunk arrived: it holds a slot and generates
        self.closed = threading.Event()  # the client's connection is closed
        self.status: int | None = None
        self.headers: httpx.Headers | None = None
        self.error: BaseException | None = None


class StreamHolder:
    """Holds streaming requests open on an event loop of its own thread, and lets each go on demand by
    cancelling its task: the client disconnects at once, wherever the stream is (waiting in the queue,
    with only a heartbeat every 10 s, or generating), which frees its slot or its place in line."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._held: list[tuple[HeldStream, concurrent.futures.Future[None]]] = []

    def __enter__(self) -> StreamHolder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # The last held first: streams still waiting in the router's queue leave it before the ones ahead
        # of them free a slot, so none of them reaches Ollama only to be cancelled there (a request
        # cancelled while it waits in Ollama's own scheduler can keep its handler for good).
        for held, _ in reversed(self._held):
            self._disconnect(held)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def hold(self, url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> HeldStream:
        held = HeldStream()
        future = asyncio.run_coroutine_threadsafe(self._hold(held, url, body, headers or {}), self._loop)
        self._held.append((held, future))
        return held

    @staticmethod
    async def _hold(held: HeldStream, url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        try:
            async with (
                httpx.AsyncClient(timeout=300) as client,
                client.stream("POST", url, json={**body, "stream": True}, headers=headers) as response,
            ):
                held.status, held.headers = response.status_code, response.headers
                held.opened.set()
                lines = response.aiter_lines()
                async for line in lines:
                    if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                        held.first_chunk.set()  # generated text, not only the opening role chunk
                        # Stay inside the loop: leaving it would finalize the line iterator, which closes
                        # the response, and so the connection, before this stream is let go.
                        await asyncio.Event().wait()  # until let go
                await asyncio.Event().wait()  # a stream that ended by itself stays held too
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            held.error = exc
        finally:
            held.opened.set()
            held.closed.set()

    def leave(self, held: HeldStream) -> None:
        """Disconnect `held` and wait until its connection is closed."""
        assert self._disconnect(held), "the held stream did not close"
        assert held.error is None, f"the held stream failed: {held.error!r}"

    def _disconnect(self, held: HeldStream) -> bool:
        (future,) = [future for candidate, future in self._held if candidate is held]
        # Its task must have started for its clean-up to run: it has once the router answered it.
        held.opened.wait(60)
        future.cancel()
        return held.closed.wait(60)


def chart_redis_argument(flag: str) -> str:
    """The value the chart's bundled Redis is started with for `flag` (the list item after it)."""
    items: list[str] = re.findall(r"^\s*-\s+(.+?)\s*$", CHART_REDIS_TEMPLATE.read_text(), flags=re.MULTILINE)
    return items[items.index(flag) + 1].strip("\"'")


# ---------------------------------------------------------------------------------------------------
# 6. The Redis cache is bounded by Redis's own LRU eviction, as the chart configures its Redis.


def test_the_charts_redis_keeps_the_cache_within_maxmemory_by_evicting(redis_server: RedisServer) -> None:
    """The router does not bound the Redis cache itself (RedisStore only sets a TTL; MODELFLEET_CACHE_SIZE
    bounds only the in-process cache): the bound is the chart's Redis, started with `--maxmemory` and
    `--maxmemory-policy allkeys-lru`. With that policy, and a bound scaled down from the chart's 256mb
    (the mechanism is the same, and 256 MB of writes would only be slower), writing three times the bound
    through the router's own cache code keeps Redis within it by evicting entries, and never fails a
    write: the cache's circuit stays closed and no cache error is counted. (With Redis's default policy,
    noeviction, the same writes are refused with OOM, which would open the circuit.)"""
    policy = chart_redis_argument("--maxmemory-policy")
    assert chart_redis_argument("--maxmemory") == "{{ .Values.redis.maxMemory | quote }}"
    bound = 4 * 1024 * 1024
    entry_text = "x" * (16 * 1024)
    written = 3 * bound // len(entry_text)

    async def scenario() -> dict[str, Any]:
        client = redis.asyncio.Redis(host=redis_server.host, port=redis_server.port, socket_timeout=5)
        try:
            await client.config_set("maxmemory", bound)
            await client.config_set("maxmemory-policy", policy)
            metrics = RouterMetrics.create(with_redis=True)
            circuit = RedisCircuit(client, metrics)
            cache = ResponseCache(RedisStore(client, circuit), max_size=512, ttl_seconds=3600, metrics=metrics)
            for index in range(written):
                answer = {"id": f"chatcmpl-{index}", "choices": [{"message": {"content": entry_text}}]}
                await cache.put(f"key-{index}", answer, None)
                assert circuit.available, f"write {index} failed: {circuit.last_error}"
            # Redis evicts before it runs each command, INFO included, so this is the state between commands.
            memory = await client.info("memory")
            stats = await client.info("stats")
            entries = await client.dbsize()
            errors = metrics.registry.get_sample_value("modelfleet_cache_errors_total")
            return {"memory": memory, "stats": stats, "entries": entries, "errors": errors}
        finally:
            await client.aclose()

    state = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert policy == "allkeys-lru"
    assert state["errors"] == 0, "a write was refused instead of evicting"
    assert int(state["memory"]["maxmemory"]) == bound
    assert int(state["memory"]["used_memory"]) <= bound, state["memory"]["used_memory_human"]
    assert int(state["stats"]["evicted_keys"]) > 0
    assert 0 < state["entries"] < written
    # Three times the bound was written, so at most about a third of the entries can remain.
    assert state["entries"] * len(entry_text) <= bound


# ---------------------------------------------------------------------------------------------------
# 1. Fair queueing: a key's weight, its priority band, and the priority header that only lowers it.

# Long enough that it cannot end while the test fills the queue behind it (the test checks that it did not):
# the base model tells this story to the length limit (see test_router_queueing.py).
BLOCKER = {"messages": [{"role": "user", "content": "Tell a long story about a lighthouse keeper."}],
           "max_tokens": 4000, "temperature": 0, "use_cache": False}  # fmt: skip
COMPLETION_LOGGED = re.compile(r'msg="completion request" .*\bprompt=(\d+)\b')
ORDER_KEYS: dict[str, dict[str, Any]] = {
    "blocker": {},
    "heavy": {"weight": 2},
    "light": {"weight": 1},
    "interactive-team": {},
    "nightly-evals": {"priority": "batch"},
}


@pytest.fixture(scope="module")
def prompt_logging_ollama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OllamaServer]:
    """An Ollama of these tests' own with debug logging, which logs each completion it starts with the
    length of its rendered prompt, so the order in which the backend receives requests of distinct
    prompt lengths is read from the backend itself."""
    yield from start_ollama(tmp_path_factory.mktemp("ollama-debug"), debug=True)


def prompt_lengths_received(ollama: OllamaServer) -> list[int]:
    """The rendered prompt length of each completion Ollama has started, in the order it started them."""
    text = ollama.process.log_path.read_text(errors="replace")
    return [int(length) for length in COMPLETION_LOGGED.findall(text)]


@pytest.fixture
def one_slot_router(prompt_logging_ollama: OllamaServer, tmp_path: Path) -> Iterator[RouterServer]:
    """One request at a time for the model, the rest in the router's fair queue; keys with weights and
    priorities. With one slot, the backend receives each request only once the one before it has ended,
    so the order it receives them is the order the router admitted them."""
    keys = write_keys_file(tmp_path, *(hashed_key(name, f"mf-{name}", **options)
                                       for name, options in ORDER_KEYS.items()))  # fmt: skip
    models: list[dict[str, object]] = [{"name": prompt_logging_ollama.model, "url": prompt_logging_ollama.base_url,
                                        "max_in_flight": 1, "max_queue": 32}]  # fmt: skip
    with running_router(tmp_path, models, auth_required="true", api_keys_file=str(keys)) as router:
        yield router


def admission_order(
    router: RouterServer, ollama: OllamaServer, requests: list[tuple[str, str, dict[str, str]]]
) -> list[str]:
    """Send `requests` ((tag, key name, headers), in that order) while one long request holds the model's
    only slot, each only once the one before it is in the queue; then free the slot and return the tags
    in the order the backend received them."""
    url = f"{router.openai_base_url}/chat/completions"
    model = ollama.model
    holder = StreamHolder()
    with holder:
        blocker = holder.hold(url, {"model": model, **BLOCKER}, {"authorization": "Bearer mf-blocker"})
        assert blocker.first_chunk.wait(120), "the blocking request never started generating"
        return requests_behind(router, ollama, holder, blocker, requests)


def requests_behind(
    router: RouterServer,
    ollama: OllamaServer,
    holder: StreamHolder,
    blocker: HeldStream,
    requests: list[tuple[str, str, dict[str, str]]],
) -> list[str]:
    url = f"{router.openai_base_url}/chat/completions"
    model = ollama.model
    statuses: dict[str, int] = {}
    # Each request's prompt has a length of its own (the same text, padded), which is how the backend's
    # log names it.
    contents = {tag: "Say hello." + "!" * index for index, (tag, _, _) in enumerate(requests)}
    started_before = len(prompt_lengths_received(ollama))

    def ask(tag: str, key: str, headers: dict[str, str]) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": contents[tag]}],
                "max_tokens": 2, "temperature": 0, "use_cache": False}  # fmt: skip
        response = httpx.post(url, json=body, headers={"authorization": f"Bearer mf-{key}", **headers}, timeout=300)
        statuses[tag] = response.status_code

    threads = []
    for position, (tag, key, headers) in enumerate(requests, start=1):
        thread = threading.Thread(target=ask, args=(tag, key, headers), daemon=True)
        thread.start()
        threads.append(thread)
        # Event, not clock: this one waits in line before the next is sent, so arrival order is known.
        wait_until(depth_reaches(router, model, position), timeout=60, interval=0.02,
                   on_timeout=lambda: f"(answered: {statuses}; queue depth {queue_depth(router, model)})")  # fmt: skip
    # Every request waited at once behind the blocker (it did not end early): their order is the queue's.
    assert queue_depth(router, model) == len(requests)
    assert in_flight(router, model) == 1
    holder.leave(blocker)
    for thread in threads:
        thread.join(timeout=300)
    assert statuses == {tag: 200 for tag, _, _ in requests}
    lengths = prompt_lengths_received(ollama)[started_before:]
    # The chat template adds the same text around every prompt.
    template = min(lengths) - min(len(content) for content in contents.values())
    by_length = {len(content) + template: tag for tag, content in contents.items()}
    assert sorted(lengths) == sorted(by_length), "each queued request reached the backend exactly once"
    return [by_length[length] for length in lengths]


def test_a_heavier_key_gets_its_weights_share_of_a_busy_models_slots(
    one_slot_router: RouterServer, prompt_logging_ollama: OllamaServer
) -> None:
    """`light` (weight 1) queues three requests, then `heavy` (weight 2) six. Start-time fair queueing
    spaces each key's requests by 1/weight in virtual time (light at 0, 1, 2; heavy at 0, 0.5, 1, 1.5,
    2, 2.5; ties in arrival order), so heavy gets two slots for each of light's: neither arrival order
    (light's three first) nor equal shares (alternating)."""
    requests: list[tuple[str, str, dict[str, str]]] = [(f"light-{i}", "light", {}) for i in (1, 2, 3)]
    requests += [(f"heavy-{i}", "heavy", {}) for i in range(1, 7)]
    received = admission_order(one_slot_router, prompt_logging_ollama, requests)
    assert received == ["light-1", "heavy-1", "heavy-2", "light-2", "heavy-3", "heavy-4", "light-3", "heavy-5",
                        "heavy-6"]  # fmt: skip


def test_interactive_goes_before_batch_and_the_header_only_lowers_a_keys_priority(
    one_slot_router: RouterServer, prompt_logging_ollama: OllamaServer
) -> None:
    """`nightly-evals` has priority batch in the keys file; `interactive-team` the default, interactive.
    Every interactive request starts before any batch one, whatever the arrival order; within a band,
    each key's requests are spaced in virtual time. `X-ModelFleet-Priority: batch` moves an interactive
    key's request into the batch band; `X-ModelFleet-Priority: interactive` does not lift a batch key's."""
    lower = {"x-modelfleet-priority": "batch"}
    raise_ = {"x-modelfleet-priority": "interactive"}
    requests = [
        ("evals-1", "nightly-evals", {}),
        ("evals-2", "nightly-evals", {}),
        ("team-lowered", "interactive-team", lower),  # batch band, the team's first in virtual time
        ("team-1", "interactive-team", {}),
        ("evals-raised", "nightly-evals", raise_),  # stays in the batch band
        ("team-2", "interactive-team", raise_),  # interactive already: the header changes nothing
    ]
    received = admission_order(one_slot_router, prompt_logging_ollama, requests)
    # Interactive band: team-1 (virtual 1), team-2 (2). Batch band: evals-1 and team-lowered (both 0, in
    # arrival order), evals-2 (1), evals-raised (2).
    assert received == ["team-1", "team-2", "evals-1", "team-lowered", "evals-2", "evals-raised"]


# ---------------------------------------------------------------------------------------------------
# 2. The token budget's refunds: what each outcome is charged in the end.


def reserved_tokens(content: str, max_tokens: int) -> int:
    """What docs/router.md says a request reserves: its prompt at about 4 characters a token, plus max_tokens."""
    return math.ceil(len(content) / 4) + max_tokens


def chat_body(content: str, max_tokens: int, **extra: object) -> dict[str, Any]:
    return {"model": "gemma3:270m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}  # fmt: skip


def remaining_tokens(response: httpx.Response) -> int:
    return remaining_tokens_of(response.headers)


def remaining_tokens_of(headers: httpx.Headers) -> int:
    """What the key may still use, as its last admission reported it."""
    return int(headers["x-ratelimit-remaining-tokens"])


# ---------------------------------------------------------------------------------------------------
# 3. Ollama's own fields reach its native API where it reads them.


@pytest.fixture
def native_router(ollama_server: OllamaServer, tmp_path: Path) -> Iterator[RouterServer]:
    """The router in front of the real Ollama through its native API (`api: ollama`)."""
    models: list[dict[str, object]] = [{"name": ollama_server.model, "url": ollama_server.base_url, "api": "ollama"}]
    with running_router(tmp_path, models) as router:
        yield router


def loaded_model_expiry(ollama: OllamaServer) -> datetime.datetime:
    """When Ollama will unload the model, from its own /api/ps."""
    loaded = httpx.get(f"{ollama.base_url}/api/ps", timeout=10).json()["models"]
    (entry,) = [model for model in loaded if model["name"] == ollama.model]
    # Go prints nanoseconds; Python parses at most microseconds.
    text = re.sub(r"(\.\d{6})\d+", r"\1", entry["expires_at"])
    return datetime.datetime.fromisoformat(text)


FOREVER = datetime.datetime(2200, 1, 1, tzinfo=datetime.UTC)  # OLLAMA_KEEP_ALIVE=-1: about 292 years away


def test_keep_alive_reaches_ollama_and_sets_when_it_unloads_the_model(
    native_router: RouterServer, ollama_server: OllamaServer
) -> None:
    url = f"{native_router.openai_base_url}/chat/completions"
    httpx.post(f"{ollama_server.base_url}/api/generate", json={"model": ollama_server.model, "keep_alive": -1},
               timeout=120).raise_for_status()  # fmt: skip
    assert loaded_model_expiry(ollama_server) > FOREVER, "the fixture's Ollama keeps its model loaded for ever"
    sent = datetime.datetime.now(datetime.UTC)
    try:
        answer = httpx.post(url, json=chat_body("Hi", 2, keep_alive="37m"), timeout=120)
        assert answer.status_code == 200, answer.text
        # Ollama sets the expiry once the request has released the model, just after answering: wait for it.
        wait_until(lambda: loaded_model_expiry(ollama_server) < FOREVER, timeout=30)
        read = datetime.datetime.now(datetime.UTC)
        expiry = loaded_model_expiry(ollama_server)
        assert sent + datetime.timedelta(minutes=37) <= expiry <= read + datetime.timedelta(minutes=37), expiry
    finally:
        # Back to the fixture's "for ever", for the tests that share this Ollama.
        httpx.post(f"{ollama_server.base_url}/api/generate", json={"model": ollama_server.model, "keep_alive": -1},
                   timeout=120).raise_for_status()  # fmt: skip
        wait_until(lambda: loaded_model_expiry(ollama_server) > FOREVER, timeout=30)


def test_think_reaches_ollama_which_refuses_it_for_a_model_that_cannot_think(native_router: RouterServer) -> None:
    """Gemma 3 has no thinking capability: Ollama itself answers `think: true` with a 400 naming it, and
    accepts `think: false`. A `think` lost on the way would make the first succeed."""
    url = f"{native_router.openai_base_url}/chat/completions"
    refused = httpx.post(url, json=chat_body("Hi", 2, think=True), timeout=120)
    assert refused.status_code == 400, refused.text
    assert "does not support thinking" in refused.json()["error"]["message"]
    assert httpx.post(url, json=chat_body("Hi", 2, think=False), timeout=120).status_code == 200


def test_format_and_options_reach_ollama(native_router: RouterServer) -> None:
    """`format` (a JSON Schema that allows one object only) constrains what Ollama generates to exactly
    that object, which the base model would never write by itself. `options` are Ollama's sampling
    options: a `stop` given only there ends the same greedy answer just before that string."""
    url = f"{native_router.openai_base_url}/chat/completions"
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes"]}},
              "required": ["answer"], "additionalProperties": False}  # fmt: skip
    shaped = httpx.post(url, json=chat_body("Is the sea blue?", 40, format=schema, use_cache=False), timeout=120)
    assert shaped.status_code == 200, shaped.text
    assert httpx.Response(200, content=shaped.json()["choices"][0]["message"]["content"]).json() == {"answer": "yes"}

    story = "Write one sentence about a lighthouse keeper."
    free = httpx.post(url, json=chat_body(story, 24, options={}, use_cache=False), timeout=120)
    text = free.json()["choices"][0]["message"]["content"]
    words = text.split()
    assert len(words) >= 3, f"a longer answer is needed to stop it early: {text!r}"
    stop = words[2]
    stopped = httpx.post(url, json=chat_body(story, 24, options={"stop": [stop]}, use_cache=False), timeout=120)
    assert stopped.status_code == 200, stopped.text
    stopped_text = stopped.json()["choices"][0]["message"]["content"]
    assert stopped_text.rstrip() == text[: text.index(stop)].rstrip()
    assert stopped.json()["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------------------------
# 4. Retry-After of a full queue: from the recent requests' durations.


def test_retry_after_of_a_full_queue_is_the_median_recent_duration_times_the_waves_ahead(
    ollama_server: OllamaServer, tmp_path: Path
) -> None:
    """queue.py: Retry-After = max(1, ceil(median of the last 32 requests' durations x (waiting + running)
    / slots)), a request's duration running from its admission to the release of its slot. Three
    requests of different lengths run one after the other; then one runs and eight wait (a full queue,
    9 waves of work for 1 slot). Each duration lies between Ollama's own time for that request (inside
    the slot) and the time its client waited (around it); the median of each set bounds the median, so
    the value must lie between what the formula gives for the two."""
    models: list[dict[str, object]] = [{"name": ollama_server.model, "url": ollama_server.base_url,
                                        "max_in_flight": 1, "max_queue": 8}]  # fmt: skip
    counting = "Count from one to one thousand: 1, 2, 3,"
    with running_router(tmp_path, models) as router:
        url = f"{router.openai_base_url}/chat/completions"
        before = settled_chat_calls(ollama_server)
        client_seconds = []
        for max_tokens in (8, 32, 96):
            started = time.monotonic()
            answer = httpx.post(url, json=chat_body(counting, max_tokens, use_cache=False), timeout=300)
            client_seconds.append(time.monotonic() - started)
            assert answer.status_code == 200, answer.text
        expect_chat_calls(ollama_server, before + 3)
        ollama_seconds = ollama_server.finished_chat_durations()[before : before + 3]

        with StreamHolder() as holder:
            running = holder.hold(url, {"model": ollama_server.model, **BLOCKER})
            assert running.first_chunk.wait(120)
            for waiting in range(1, 9):
                holder.hold(url, {"model": ollama_server.model, **BLOCKER})
                wait_until(depth_reaches(router, ollama_server.model, waiting), timeout=60, interval=0.02)
            refused = httpx.post(url, json=chat_body(counting, 8, use_cache=False), timeout=60)
            # Refused as full, so at that instant 8 waited and the one slot was taken: 9 waves. Nothing else
            # had finished (a finished blocker would have let a waiting stream start, and this one wait).
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "queue_full"
    waves = 9
    lowest = max(1, math.ceil(statistics.median(ollama_seconds) * waves))
    highest = max(1, math.ceil(statistics.median(client_seconds) * waves))
    retry_after = int(refused.headers["retry-after"])
    print(f"\nRetry-After {retry_after}; durations: Ollama {ollama_seconds}, clients {client_seconds}")
    assert lowest <= retry_after <= highest


# ---------------------------------------------------------------------------------------------------
# 5. MODELFLEET_CACHE_PER_KEY: tenants never share answers, unless the cache is shared on purpose.


@pytest.mark.parametrize("per_key", [True, False], ids=["per-key", "shared"])
def test_cache_per_key_keeps_one_keys_answer_from_another(
    per_key: bool, ollama_server: OllamaServer, tmp_path: Path
) -> None:
    keys = write_keys_file(tmp_path, hashed_key("tenant-a", "mf-a"), hashed_key("tenant-b", "mf-b"))
    models: list[dict[str, object]] = [{"name": ollama_server.model, "url": ollama_server.base_url}]
    body = chat_body("Name a planet.", 6)
    with running_router(tmp_path, models, auth_required="true", api_keys_file=str(keys),
                        cache_per_key=str(per_key).lower()) as router:  # fmt: skip
        url = f"{router.openai_base_url}/chat/completions"

        def ask(key: str) -> httpx.Response:
            response = httpx.post(url, json=body, headers={"authorization": f"Bearer {key}"}, timeout=120)
            assert response.status_code == 200, response.text
            return response

        calls = settled_chat_calls(ollama_server)
        assert ask("mf-a").headers["x-modelfleet-cache"] == "miss"
        expect_chat_calls(ollama_server, calls + 1)
        other_key = ask("mf-b")
        same_key = ask("mf-a")
        assert same_key.headers["x-modelfleet-cache"] == "hit", "a key is served its own cached answer"
        if per_key:
            assert other_key.headers["x-modelfleet-cache"] == "miss"
            expect_chat_calls(ollama_server, calls + 2)  # B's answer came from the backend
        else:
            assert other_key.headers["x-modelfleet-cache"] == "hit"
            expect_chat_calls(ollama_server, calls + 1)
