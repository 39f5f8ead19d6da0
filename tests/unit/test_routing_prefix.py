"""The affinity key's exact text and digest, and the rendezvous order: every router replica, of any
version in a rolling upgrade, must compute the same home for a prompt."""

from __future__ import annotations

from typing import Any

import pytest

from modelfleet.server.routing import affinity_key, bounded_choice, ranked, stable_prefix

pytestmark = pytest.mark.unit

REPLICAS = [f"http://10.0.0.{i}:11434" for i in range(1, 5)]


def test_the_prefix_joins_each_message_as_role_and_text_up_to_the_first_user_message() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        "not a message",
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": None}, {"type": "text", "text": "hi"}]},
        {"role": "user", "content": "later turns do not count"},
    ]
    assert stable_prefix({"messages": messages}) == "system\x1fBe brief.\x1eassistant\x1f\x1euser\x1fhi\x1e"
    # Something that is not a message is skipped, not the end of the prefix.
    assert stable_prefix({"messages": [1, {"role": "user", "content": "hi"}]}) == "user\x1fhi\x1e"


def test_the_prefix_is_cut_at_the_limit_even_inside_a_message() -> None:
    first = {"role": "system", "content": "a"}  # "system\x1fa\x1e": 9 characters
    body = {"messages": [first, {"role": "user", "content": "hello"}]}
    assert stable_prefix(body, limit=10) == "system\x1fa\x1eu"
    assert stable_prefix(body, limit=9) == "system\x1fa\x1e"
    assert stable_prefix(body, limit=100) == "system\x1fa\x1euser\x1fhello\x1e"


@pytest.mark.parametrize("body", [{"prompt": []}, {"prompt": None}, {"prompt": [7]}, {"prompt": 7}, {}])
def test_a_prompt_without_text_has_no_prefix_and_no_key(body: dict[str, Any]) -> None:
    assert stable_prefix(body) == ""
    assert affinity_key(body) is None


def test_the_key_is_a_16_byte_digest_of_the_prefix() -> None:
    key = affinity_key({"prompt": "hello"})
    assert key is not None
    assert len(key) == 16
    assert key == affinity_key({"messages": "not a list", "prompt": "hello"})


def test_the_rendezvous_order_is_fixed_for_a_key_highest_weight_first() -> None:
    # Pinned: a change of the weights would move every key's home when the routers are upgraded.
    assert ranked(bytes(16), REPLICAS) == [REPLICAS[2], REPLICAS[0], REPLICAS[3], REPLICAS[1]]
    assert ranked(b"k" * 16, REPLICAS) == [REPLICAS[2], REPLICAS[3], REPLICAS[1], REPLICAS[0]]


def test_the_load_bound_given_is_the_one_applied() -> None:
    home, other = ranked(bytes(16), REPLICAS[:2])
    # 2 and 0 outstanding: the default bound's limit is ceil(1.25 x 3 / 2) = 2, a bound of 3 makes it 5.
    assert bounded_choice(bytes(16), {home: 2, other: 0}) == (other, 1)
    assert bounded_choice(bytes(16), {home: 2, other: 0}, bound=3.0) == (home, 0)
