"""The rate limiter's rules at their edges: which dimension a refusal names, the resets and their rounding,
what an unlimited or degraded decision says, and the Redis keys of a subject."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from modelfleet.server.ratelimit import (
    Decision,
    Limits,
    MemoryRateLimiter,
    RateLimiterUnavailable,
    RedisRateLimiter,
)
from tests.support.fake_clock import FakeClock, run

pytestmark = pytest.mark.unit


def at(limiter: MemoryRateLimiter, clock: FakeClock, when: float, limits: Limits, reserve: int = 0) -> Decision:
    clock.now = when
    return run(limiter.acquire("key", limits, reserve=reserve))


def charge(limiter: MemoryRateLimiter, clock: FakeClock, when: float, limits: Limits, tokens: int) -> None:
    clock.now = when
    run(limiter.charge_tokens("key", limits, tokens))


def decision(**fields: Any) -> Decision:
    base: dict[str, Any] = {
        "allowed": True,
        "exceeded": None,
        "requests_limit": 10,
        "requests_remaining": 9,
        "requests_reset_seconds": 0.0,
        "tokens_limit": None,
        "tokens_remaining": None,
        "tokens_reset_seconds": 0.0,
        "retry_after_seconds": 0,
    }
    return Decision(**(base | fields))


@pytest.mark.parametrize(("charged_at", "exceeded", "retry_after"), [(0.0, "requests", 60), (10.0, "tokens", 70)])
def test_both_exceeded_names_the_later_reset_and_requests_on_a_tie(
    charged_at: float, exceeded: str, retry_after: int
) -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=1, tokens=10, window_seconds=60)
    charge(limiter, clock, charged_at, limits, 10)
    clock.now = 0.0
    assert at(limiter, clock, 0.0, Limits(requests=1, tokens=None, window_seconds=60)).allowed
    refused = at(limiter, clock, 0.0, limits)
    assert (refused.allowed, refused.exceeded, refused.retry_after_seconds) == (False, exceeded, retry_after)


def test_a_dimension_without_a_limit_has_no_reset() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    charge(limiter, clock, 0.0, Limits(requests=None, tokens=100), 10)
    tokens_only = at(limiter, clock, 1.0, Limits(requests=None, tokens=100))
    assert tokens_only.requests_reset_seconds == 0.0
    assert tokens_only.tokens_reset_seconds == pytest.approx(59.0)
    requests_only = at(limiter, clock, 2.0, Limits(requests=5, tokens=None))
    assert requests_only.requests_reset_seconds == pytest.approx(60.0)
    assert requests_only.tokens_reset_seconds == 0.0


def test_no_limits_decide_nothing_and_say_so() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock())
    assert run(limiter.acquire("key", Limits(requests=None, tokens=None), reserve=50)) == Decision(
        allowed=True,
        exceeded=None,
        requests_limit=None,
        requests_remaining=None,
        requests_reset_seconds=0.0,
        tokens_limit=None,
        tokens_remaining=None,
        tokens_reset_seconds=0.0,
        retry_after_seconds=0,
        degraded=False,
        reservation=None,
    )


def test_a_charge_of_no_tokens_records_nothing() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    charge(limiter, clock, 0.0, Limits(requests=None, tokens=100), 0)
    assert limiter.tracked_subjects == 0
    assert at(limiter, clock, 1.0, Limits(requests=None, tokens=100)).tokens_reset_seconds == 0.0


def test_resets_round_up_to_whole_seconds_and_tenths_but_not_for_float_noise() -> None:
    headers = decision(requests_reset_seconds=0.0).headers()
    assert (headers["x-ratelimit-reset"], headers["x-ratelimit-reset-requests"]) == ("0", "0s")
    # Noise below a microsecond, in seconds for the whole seconds and in tenths for OpenAI's format.
    assert decision(requests_reset_seconds=13.0000004).headers()["x-ratelimit-reset"] == "13"
    assert decision(requests_reset_seconds=13.00000004).headers()["x-ratelimit-reset-requests"] == "13s"
    headers = decision(requests_reset_seconds=0.30000004).headers()
    assert (headers["x-ratelimit-reset"], headers["x-ratelimit-reset-requests"]) == ("1", "0.3s")
    headers = decision(requests_reset_seconds=13.01).headers()
    assert (headers["x-ratelimit-reset"], headers["x-ratelimit-reset-requests"]) == ("14", "13.1s")


PREFIX = "modelfleet:ratelimit:"


def limiter_on(redis: Any, fail_open: bool = True) -> RedisRateLimiter:
    return RedisRateLimiter(redis, fail_open=fail_open)


class DownRedis:
    """A Redis client whose every script call fails as if the server were unreachable."""

    def register_script(self, _script: str) -> Any:
        async def call(**_: Any) -> Any:
            raise RedisConnectionError("connection refused")

        return call


def test_the_redis_keys_of_a_subject_are_tagged_with_it_or_with_its_digest() -> None:
    limiter = limiter_on(DownRedis())
    assert limiter.keys("key-1") == (
        PREFIX + "{key-1}:requests",
        PREFIX + "{key-1}:tokens",
        PREFIX + "{key-1}:tokens-sum",
    )
    for subject in ("", "a{b", "a}b", "{x}"):
        tag = "sha256:" + hashlib.sha256(subject.encode()).hexdigest()[:32]
        assert limiter.keys(subject)[0] == f"{PREFIX}{{{tag}}}:requests", subject


def test_a_store_failure_admits_unchecked_with_the_limits_or_refuses() -> None:
    limits = Limits(requests=5, tokens=100)
    degraded = run(limiter_on(DownRedis()).acquire("key", limits))
    assert degraded == Decision(
        allowed=True,
        exceeded=None,
        requests_limit=5,
        requests_remaining=None,
        requests_reset_seconds=0.0,
        tokens_limit=100,
        tokens_remaining=None,
        tokens_reset_seconds=0.0,
        retry_after_seconds=0,
        degraded=True,
    )
    with pytest.raises(RateLimiterUnavailable):
        run(limiter_on(DownRedis(), fail_open=False).acquire("key", limits))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"requests": -1, "tokens": None}, "the requests limit must be >= 0 or None, not -1"),
        ({"requests": None, "tokens": -5}, "the tokens limit must be >= 0 or None, not -5"),
        ({"requests": 1, "tokens": 1, "window_seconds": 0}, "window_seconds must be > 0, not 0"),
    ],
)
def test_invalid_limits_say_which_and_why(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(") + "$"):
        Limits(**kwargs)


def test_only_a_token_budget_takes_a_reservation_and_a_plain_request_reserves_nothing() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock())
    plain = run(limiter.acquire("key", Limits(requests=None, tokens=100)))
    assert (plain.tokens_remaining, plain.reservation) == (100, None)
    one = run(limiter.acquire("key", Limits(requests=None, tokens=100), reserve=1))
    assert one.tokens_remaining == 99
    assert one.reservation is not None
    assert (one.reservation.subject, one.reservation.tokens) == ("key", 1)
    requests_only = run(limiter.acquire("other", Limits(requests=5, tokens=None), reserve=50))
    assert (requests_only.allowed, requests_only.reservation) == (True, None)


def test_resets_below_a_second_are_exact() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    requests = Limits(requests=1, tokens=None, window_seconds=60)
    at(limiter, clock, 0.0, requests)
    assert at(limiter, clock, 59.5, requests).requests_reset_seconds == pytest.approx(0.5)
    tokens = Limits(requests=None, tokens=100, window_seconds=60)
    other = MemoryRateLimiter(clock=clock)
    clock.now = 0.0
    run(other.charge_tokens("key", tokens, 10))
    clock.now = 59.5
    assert run(other.acquire("key", tokens)).tokens_reset_seconds == pytest.approx(0.5)
    clock.now = 59.0
    run(other.charge_tokens("key", tokens, 95))
    clock.now = 59.5
    refused = run(other.acquire("key", tokens, reserve=5))  # 105 used: fits once the first 10 leave
    assert not refused.allowed
    assert refused.tokens_reset_seconds == pytest.approx(0.5)


def test_a_request_refused_for_tokens_leaves_no_request_reset() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=5, tokens=10)
    charge(limiter, clock, 0.0, limits, 20)
    refused = at(limiter, clock, 1.0, limits)
    assert (refused.exceeded, refused.requests_reset_seconds) == ("tokens", 0.0)


def test_a_budget_of_one_token_and_of_none() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    assert at(limiter, clock, 0.0, Limits(requests=None, tokens=1)).tokens_reset_seconds == 0.0
    none = at(limiter, clock, 0.0, Limits(requests=None, tokens=0, window_seconds=30))
    assert (none.allowed, none.tokens_reset_seconds, none.retry_after_seconds) == (False, 30, 30)


def test_a_subject_idle_for_a_whole_window_is_forgotten() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=1, tokens=None, window_seconds=60)
    at(limiter, clock, 0.0, limits)
    clock.now = 60.0
    run(limiter.acquire("another", limits))
    assert limiter.tracked_subjects == 1


def test_evicting_a_subject_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    limiter = MemoryRateLimiter(clock=FakeClock(), max_subjects=1)
    limits = Limits(requests=1, tokens=None)
    with caplog.at_level("DEBUG", logger="modelfleet.server.ratelimit"):
        run(limiter.acquire("first", limits))
        run(limiter.acquire("second", limits))
    assert caplog.messages == ["rate limiter evicted subject first to stay within 1"]


def test_a_window_shorter_than_a_second_is_valid() -> None:
    assert Limits(requests=1, tokens=None, window_seconds=0.5).window_seconds == 0.5
