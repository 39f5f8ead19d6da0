"""Replica choice: prefix affinity by rendezvous hashing with bounded load, and least loaded."""

from __future__ import annotations

from collections import Counter

import pytest

from modelfleet.server.metrics import RouterMetrics
from modelfleet.server.model_spec import ModelSpec
from modelfleet.server.registry import ModelRegistry, ServedModel
from modelfleet.server.routing import AFFINITY_CHARS, affinity_key, bounded_choice, load_limit, ranked, stable_prefix
from modelfleet.server.settings import StaticModel

pytestmark = pytest.mark.unit

SYSTEM = {"role": "system", "content": "You are the support agent of a bicycle shop. " * 10}


def conversation(first: str, turns: int) -> list[dict[str, str]]:
    messages = [SYSTEM, {"role": "user", "content": first}]
    for turn in range(turns):
        messages += [{"role": "assistant", "content": f"answer {turn}"}, {"role": "user", "content": f"more {turn}"}]
    return messages


def key(messages: list[dict[str, str]]) -> bytes:
    found = affinity_key({"messages": messages})
    assert found is not None
    return found


def test_a_conversation_keeps_its_key_as_it_grows_and_another_gets_its_own() -> None:
    assert key(conversation("My brakes squeak.", 0)) == key(conversation("My brakes squeak.", 3))
    assert key(conversation("My brakes squeak.", 0)) != key(conversation("My chain fell off.", 0))
    # The role is part of the key: the same words as a user message are another prompt.
    assert key([{"role": "user", "content": "hi"}]) != key([{"role": "system", "content": "hi"}])


def test_a_long_system_prompt_alone_makes_the_key() -> None:
    long_system = {"role": "system", "content": "Rules of the house. " * 300}
    assert len(long_system["content"]) > AFFINITY_CHARS
    first = [long_system, {"role": "user", "content": "a"}]
    second = [long_system, {"role": "user", "content": "b"}]
    assert key(first) == key(second), "conversations that open with the same long system prompt share a home"
    assert len(stable_prefix({"messages": first})) == AFFINITY_CHARS


def test_content_parts_prompts_and_empty_prompts() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {}}]}]
    assert stable_prefix({"messages": parts}) == "user\x1flook<image_url>\x1e"
    assert stable_prefix({"prompt": ["first", "second"]}) == "first"
    assert stable_prefix({"prompt": "x" * 5000}) == "x" * AFFINITY_CHARS
    assert affinity_key({"prompt": ""}) is None
    assert affinity_key({"messages": []}) is None


REPLICAS = [f"http://10.0.0.{i}:11434" for i in range(1, 5)]
KEYS = [key(conversation(f"question {i}", 0)) for i in range(2000)]


def test_rendezvous_spreads_keys_evenly_and_a_removed_replica_moves_only_its_own() -> None:
    homes = {k: ranked(k, REPLICAS)[0] for k in KEYS}
    shares = Counter(homes.values())
    assert all(0.2 < shares[r] / len(KEYS) < 0.3 for r in REPLICAS), shares
    gone = REPLICAS[1]
    survivors = [r for r in REPLICAS if r != gone]
    for k, home in homes.items():
        if home != gone:
            assert ranked(k, survivors)[0] == home, "a key whose home stays keeps it"
        else:
            assert ranked(k, survivors)[0] == ranked(k, REPLICAS)[1], "an orphaned key goes to its second choice"
    # The order does not depend on the order the replicas are listed in.
    assert ranked(KEYS[0], REPLICAS) == ranked(KEYS[0], list(reversed(REPLICAS)))


def test_the_home_takes_requests_until_the_load_bound_then_they_spill_to_the_next_choice() -> None:
    k = KEYS[0]
    first, second = ranked(k, REPLICAS[:2])
    load = {r: 0 for r in REPLICAS[:2]}
    picks = []
    for _ in range(3):  # three concurrent requests of one prefix on two replicas
        endpoint, rank = bounded_choice(k, load)
        load[endpoint] += 1
        picks.append((endpoint, rank))
    # limit = ceil(1.25 x (load + 1) / 2): 1, then 2, then 2 (the home has 2 by then)
    assert picks == [(first, 0), (first, 0), (second, 1)]
    assert load_limit({"a": 0, "b": 0}) == 1
    assert load_limit({"a": 7, "b": 0}, bound=1.25) == 5


def test_a_replica_at_its_cap_takes_no_more_and_when_all_are_the_least_loaded_does() -> None:
    k = KEYS[0]
    first, second = ranked(k, REPLICAS[:2])
    # 3 and 1 outstanding: the bound's limit is ceil(1.25 x 5 / 2) = 4, so the home takes it, unless
    # its cap is 3. Every replica at its cap (2): the least loaded.
    assert bounded_choice(k, {first: 3, second: 1}) == (first, 0)
    assert bounded_choice(k, {first: 3, second: 1}, cap=3) == (second, 1)
    assert bounded_choice(k, {first: 3, second: 2}, cap=2) == (second, 1)
    assert bounded_choice(k, {first: 2, second: 3}, cap=2) == (first, 0)


def test_under_any_load_the_choice_is_below_the_bound() -> None:
    load = dict.fromkeys(REPLICAS, 0)
    for i, k in enumerate(KEYS[:400]):
        limit = load_limit(load)
        endpoint, _ = bounded_choice(k, load)
        assert load[endpoint] < limit
        load[endpoint] += 1
        if i % 3 == 0:  # some requests finish
            busiest = max(load, key=lambda r: load[r])
            load[busiest] -= 1
    mean = sum(load.values()) / len(load)
    assert max(load.values()) <= 1.25 * mean + 1


def served(routing: str, *endpoints: str) -> ServedModel:
    spec = StaticModel.model_validate(
        {"name": "m", "url": endpoints[0], "replica_urls": list(endpoints[1:]), "routing": routing}
    ).spec()
    registry = ModelRegistry(RouterMetrics.create())
    registry.replace_source("static", [spec])
    return registry.resolve("m")


def counted(model: ServedModel, result: str) -> float:
    value = model.metrics.registry.get_sample_value(
        "modelfleet_prefix_affinity_total", {"model": "m", "result": result}
    )
    return value or 0.0


def test_prefix_routing_sends_a_prefix_home_and_counts_hits_and_misses() -> None:
    model = served("prefix", *REPLICAS[:2])
    k = KEYS[0]
    home, other = ranked(k, model.spec.endpoints)
    for _ in range(4):  # one at a time: always home, whatever the other replica's load
        endpoint = model.pick_endpoint(affinity=k)
        assert endpoint == home
        model.release_endpoint(endpoint)
    held = [model.pick_endpoint(affinity=k) for _ in range(3)]
    assert held == [home, home, other]
    assert (counted(model, "hit"), counted(model, "miss")) == (6, 1)
    # The home refused the connection: the next choice, and a miss.
    assert model.pick_endpoint(exclude=[home], affinity=k) == other
    assert counted(model, "miss") == 2


def test_least_loaded_routing_ignores_the_prefix_and_takes_turns() -> None:
    model = served("leastLoaded", *REPLICAS[:2])
    picks = []
    for _ in range(4):
        endpoint = model.pick_endpoint(affinity=KEYS[0])
        picks.append(endpoint)
        model.release_endpoint(endpoint)
    assert picks == [REPLICAS[0], REPLICAS[1], REPLICAS[0], REPLICAS[1]]
    assert counted(model, "hit") == counted(model, "miss") == 0


def test_prefix_is_the_default_and_a_single_replica_counts_nothing() -> None:
    spec = ModelSpec(name="m", api="openai", upstream_model="m", endpoints=(REPLICAS[0],))
    assert spec.routing == "prefix"
    model = served("prefix", REPLICAS[0])
    assert model.pick_endpoint(affinity=KEYS[0]) == REPLICAS[0]
    assert counted(model, "hit") == counted(model, "miss") == 0
