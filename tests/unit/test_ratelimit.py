"""The in-process sliding-log limiter on a fake clock: exact counts, window edges, token budgets, headers."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import redis.asyncio
from redis.crc import key_slot

from modelfleet.server.ratelimit import Decision, Limits, MemoryRateLimiter, RedisRateLimiter
from tests.support.fake_clock import FakeClock, run

pytestmark = pytest.mark.unit


def at(
    limiter: MemoryRateLimiter, clock: FakeClock, when: float, limits: Limits, subject: str = "key", reserve: int = 0
) -> Decision:
    clock.now = when
    return run(limiter.acquire(subject, limits, reserve=reserve))


def charge(limiter: MemoryRateLimiter, clock: FakeClock, when: float, limits: Limits, tokens: int) -> None:
    clock.now = when
    run(limiter.charge_tokens("key", limits, tokens))


def outcomes(limiter: MemoryRateLimiter, clock: FakeClock, arrivals: list[float], limits: Limits) -> list[bool]:
    """Whether each arrival, in order, was admitted; one event loop for the whole sweep."""

    async def sweep() -> list[bool]:
        allowed = []
        for when in arrivals:
            clock.now = when
            allowed.append((await limiter.acquire("key", limits)).allowed)
        return allowed

    return run(sweep())


def busiest_window(admitted: list[float], window: float) -> int:
    """The most admissions in any span (t - window, t]; the busiest such span ends on an admission."""
    return max((in_window(admitted, t, window) for t in admitted), default=0)


def in_window(admitted: list[float], t: float, window: float) -> int:
    """Admissions still in the window at t: each leaves `window` after it was admitted."""
    return sum(1 for s in admitted if s <= t < s + window)


def test_limit_admits_exactly_n_then_refuses_until_the_oldest_leaves() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=5, tokens=None, window_seconds=60)
    decisions = [at(limiter, clock, float(second), limits) for second in range(5)]
    assert [d.allowed for d in decisions] == [True] * 5
    assert [d.requests_remaining for d in decisions] == [4, 3, 2, 1, 0]

    refused = at(limiter, clock, 10.0, limits)
    assert not refused.allowed
    assert refused.exceeded == "requests"
    assert refused.requests_remaining == 0
    assert refused.requests_reset_seconds == pytest.approx(50.0)  # the request of t=0 leaves at t=60
    assert refused.retry_after_seconds == 50

    assert not at(limiter, clock, 59.999, limits).allowed
    again = at(limiter, clock, 60.0, limits)
    assert again.allowed
    assert again.retry_after_seconds == 0
    assert again.requests_remaining == 0
    assert again.requests_reset_seconds == pytest.approx(1.0)  # the request of t=1 leaves next
    edge = at(limiter, clock, 60.5, limits)
    assert not edge.allowed
    assert edge.retry_after_seconds == 1  # 0.5 s, rounded up to a whole second
    assert at(limiter, clock, 61.0, limits).allowed


def test_no_second_batch_before_the_first_leaves_the_window() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=10, tokens=None, window_seconds=60)
    assert sum(at(limiter, clock, 0.0, limits).allowed for _ in range(10)) == 10
    second_batch = [at(limiter, clock, 59.9, limits) for _ in range(10)]
    assert not any(d.allowed for d in second_batch)
    assert {d.retry_after_seconds for d in second_batch} == {1}
    assert sum(at(limiter, clock, 60.0, limits).allowed for _ in range(15)) == 10


def test_no_double_burst_across_a_fixed_window_boundary() -> None:
    """A fixed window [0, 60) would admit 10 at 59.9 and 10 more at 60.0; a token bucket most of them."""
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=10, tokens=None, window_seconds=60)
    assert sum(at(limiter, clock, 59.9, limits).allowed for _ in range(10)) == 10
    assert sum(at(limiter, clock, 60.0, limits).allowed for _ in range(10)) == 0
    assert sum(at(limiter, clock, 119.8, limits).allowed for _ in range(10)) == 0
    assert sum(at(limiter, clock, 119.9, limits).allowed for _ in range(20)) == 10


def test_saturating_sweep_admits_exactly_the_limit_per_window() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=10, tokens=None, window_seconds=60)
    steps = [step for step in range(3000) for _ in range(3)]  # 0.0 .. 299.9 s, three attempts every 0.1 s
    allowed = outcomes(limiter, clock, [step / 10 for step in steps], limits)
    admitted_steps = [step for step, ok in zip(steps, allowed, strict=True) if ok]
    admitted = [step / 10 for step in admitted_steps]
    assert busiest_window(admitted, 60) == 10
    # 3 + 3 + 3 + 1 admitted at the start of each minute, and nothing else until the first leave.
    burst = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert admitted_steps == [600 * minute + offset for minute in range(5) for offset in burst]


def test_random_arrivals_never_exceed_the_limit_and_refuse_only_when_full() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    window, limit = 60.0, 7
    limits = Limits(requests=limit, tokens=None, window_seconds=window)
    rng = random.Random(1234)
    arrivals = sorted(rng.uniform(0, 600) for _ in range(2000))
    arrivals += [59.9, 60.0, 119.9, 120.0]  # exact edges too
    arrivals.sort()
    allowed = outcomes(limiter, clock, arrivals, limits)
    admitted = [when for when, ok in zip(arrivals, allowed, strict=True) if ok]
    refused = [when for when, ok in zip(arrivals, allowed, strict=True) if not ok]
    assert busiest_window(admitted, window) == limit
    assert refused, "the load must be high enough to refuse some requests"
    # Exact, not merely conservative: every refusal saw a full window.
    for when in refused:
        assert in_window(admitted, when, window) == limit


def test_refused_requests_are_not_recorded() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=2, tokens=None, window_seconds=60)
    assert at(limiter, clock, 0.0, limits).allowed
    assert at(limiter, clock, 0.0, limits).allowed
    assert not any(at(limiter, clock, 1.0 + i / 10, limits).allowed for i in range(100))
    # Had the refusals been logged, the window would still be full at t=60.
    assert [at(limiter, clock, 60.0, limits).allowed for _ in range(3)] == [True, True, False]


def test_token_budget_refuses_the_next_request_until_the_charge_leaves() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=None, tokens=50, window_seconds=60)
    first = at(limiter, clock, 0.0, limits)
    assert first.allowed
    assert first.tokens_remaining == 50
    assert first.requests_remaining is None
    charge(limiter, clock, 1.0, limits, 60)

    refused = at(limiter, clock, 2.0, limits)
    assert not refused.allowed
    assert refused.exceeded == "tokens"
    assert refused.tokens_remaining == 0
    assert refused.tokens_reset_seconds == pytest.approx(59.0)
    assert refused.retry_after_seconds == 59
    assert not at(limiter, clock, 60.9, limits).allowed
    after = at(limiter, clock, 61.0, limits)
    assert after.allowed
    assert after.tokens_remaining == 50


def test_token_reset_waits_for_enough_charges_to_leave() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=100, tokens=20, window_seconds=60)
    charge(limiter, clock, 0.0, limits, 30)
    charge(limiter, clock, 10.0, limits, 30)
    refused = at(limiter, clock, 30.0, limits)
    assert refused.exceeded == "tokens"
    # 60 - 30 = 30 is still >= 20 once the first charge leaves; only at t=70 is there room.
    assert refused.tokens_reset_seconds == pytest.approx(40.0)
    assert refused.retry_after_seconds == 40
    assert refused.requests_remaining == 100  # the refused request was not counted
    assert not at(limiter, clock, 69.9, limits).allowed
    assert at(limiter, clock, 70.0, limits).allowed


def test_tokens_below_the_budget_still_admit() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=None, tokens=50, window_seconds=60)
    charge(limiter, clock, 0.0, limits, 20)
    charge(limiter, clock, 5.0, limits, 29)
    allowed = at(limiter, clock, 10.0, limits)
    assert allowed.allowed
    assert allowed.tokens_remaining == 1
    assert allowed.tokens_reset_seconds == pytest.approx(50.0)  # the oldest charge frees room at t=60
    charge(limiter, clock, 11.0, limits, 1)
    assert at(limiter, clock, 12.0, limits).exceeded == "tokens"


@pytest.mark.parametrize(
    ("tokens", "charged_at", "exceeded", "requests_reset", "retry_after"),
    [
        # Both exceeded: the refusal names the dimension that frees up last, and waits for it.
        (10, 30.0, "tokens", 20.0, 50),
        # Only requests exceeded: it is named, and waited for, even though tokens reset later.
        (100, 10.0, "requests", 40.0, 40),
    ],
)
def test_a_refusal_names_the_exceeded_dimension_and_retries_after_it(
    tokens: int, charged_at: float, exceeded: str, requests_reset: float, retry_after: int
) -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=1, tokens=tokens, window_seconds=60)
    assert at(limiter, clock, 0.0, limits).allowed
    charge(limiter, clock, charged_at, limits, 10)
    refused = at(limiter, clock, charged_at + 10.0, limits)
    assert refused.exceeded == exceeded
    assert refused.requests_reset_seconds == pytest.approx(requests_reset)
    assert refused.tokens_reset_seconds == pytest.approx(50.0)  # the charge leaves the window 60 s after it
    assert refused.retry_after_seconds == retry_after


def test_unlimited_dimensions_are_not_counted() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    unlimited = Limits(requests=None, tokens=None)
    decisions = [at(limiter, clock, 0.0, unlimited) for _ in range(1000)]
    assert all(d.allowed and d.requests_remaining is None and d.tokens_remaining is None for d in decisions)
    assert decisions[0].headers() == {}
    assert limiter.tracked_subjects == 0

    tokens_only = Limits(requests=None, tokens=1_000_000)
    assert all(at(limiter, clock, 1.0, tokens_only).allowed for _ in range(1000))
    run(limiter.charge_tokens("key", unlimited, 10**9))  # no token limit: nothing to charge
    assert at(limiter, clock, 1.0, tokens_only).tokens_remaining == 1_000_000


def test_zero_limit_refuses_everything() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    decision = at(limiter, clock, 0.0, Limits(requests=0, tokens=None, window_seconds=30))
    assert not decision.allowed
    assert decision.exceeded == "requests"
    assert decision.retry_after_seconds == 30


def test_subjects_are_limited_independently() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=1, tokens=None)
    assert at(limiter, clock, 0.0, limits, "a").allowed
    assert at(limiter, clock, 0.0, limits, "b").allowed
    assert not at(limiter, clock, 0.0, limits, "a").allowed


def test_tracked_subjects_stay_bounded() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock, max_subjects=3)
    limits = Limits(requests=1, tokens=None, window_seconds=60)
    for index in range(10):
        assert at(limiter, clock, float(index), limits, f"s{index}").allowed
        assert limiter.tracked_subjects == min(index + 1, 3)
    # The most recently seen subjects keep their usage; the least recent were evicted.
    assert not at(limiter, clock, 10.0, limits, "s9").allowed
    assert at(limiter, clock, 10.0, limits, "s0").allowed
    # Subjects idle for a whole window are dropped as soon as anything happens.
    assert at(limiter, clock, 200.0, limits, "fresh").allowed
    assert limiter.tracked_subjects == 1


def test_concurrent_acquires_admit_exactly_the_limit() -> None:
    async def scenario() -> list[Decision]:
        limiter = MemoryRateLimiter()
        limits = Limits(requests=10, tokens=None)
        return await asyncio.gather(*(limiter.acquire("key", limits) for _ in range(50)))

    assert sum(d.allowed for d in run(scenario())) == 10


def test_headers_of_an_allowed_request() -> None:
    decision = Decision(
        allowed=True,
        exceeded=None,
        requests_limit=60,
        requests_remaining=59,
        requests_reset_seconds=0.25,
        tokens_limit=1000,
        tokens_remaining=400,
        tokens_reset_seconds=12.0,
        retry_after_seconds=0,
    )
    assert decision.headers() == {
        "x-ratelimit-limit": "60",
        "x-ratelimit-remaining": "59",
        "x-ratelimit-reset": "1",
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "0.3s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "400",
        "x-ratelimit-reset-tokens": "12s",
    }


def test_headers_of_a_refused_request_from_the_limiter() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=2, tokens=None, window_seconds=60)
    at(limiter, clock, 0.0, limits)
    at(limiter, clock, 0.0, limits)
    assert at(limiter, clock, 47.5, limits).headers() == {
        "x-ratelimit-limit": "2",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "13",
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "12.5s",
        "retry-after": "13",
    }


def test_plain_headers_describe_tokens_when_only_tokens_are_limited() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=None, tokens=100, window_seconds=60)
    charge(limiter, clock, 0.0, limits, 150)
    assert at(limiter, clock, 1.0, limits).headers() == {
        "x-ratelimit-limit": "100",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "59",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "59s",
        "retry-after": "59",
    }


def test_degraded_headers_give_only_the_limits() -> None:
    decision = Decision(
        allowed=True,
        exceeded=None,
        requests_limit=5,
        requests_remaining=None,
        requests_reset_seconds=0.0,
        tokens_limit=None,
        tokens_remaining=None,
        tokens_reset_seconds=0.0,
        retry_after_seconds=0,
        degraded=True,
    )
    assert decision.headers() == {"x-ratelimit-limit": "5", "x-ratelimit-limit-requests": "5"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"requests": -1, "tokens": None},
        {"requests": None, "tokens": -5},
        {"requests": 1, "tokens": 1, "window_seconds": 0},
    ],
)
def test_invalid_limits_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        Limits(**kwargs)


@pytest.mark.parametrize("subject", ["key-1", "", "a}b{c", "{x}"])
def test_redis_keys_of_a_subject_share_one_cluster_slot(subject: str) -> None:
    limiter = RedisRateLimiter(redis.asyncio.Redis(), fail_open=True)  # constructing connects to nothing
    keys = limiter.keys(subject)
    assert len(set(keys)) == 3
    assert len({key_slot(key.encode()) for key in keys}) == 1
    assert keys != limiter.keys(subject + "x")


def test_a_reservation_must_fit_whole_and_settling_refunds_the_rest() -> None:
    """Budget 100: a request reserving 60 fits, a second reserving 60 does not (no overshoot, even though
    the first has not ended); once the first settles at 25, the second fits."""
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=None, tokens=100, window_seconds=60)

    async def scenario() -> None:
        first = await limiter.acquire("key", limits, reserve=60)
        assert first.allowed
        assert first.reservation is not None
        assert first.tokens_remaining == 40
        second = await limiter.acquire("key", limits, reserve=60)
        assert not second.allowed
        assert second.exceeded == "tokens"
        assert second.reservation is None, "a refused request reserves nothing"
        clock.now = 5
        await limiter.settle(first.reservation, limits, 25)
        third = await limiter.acquire("key", limits, reserve=60)
        assert third.allowed
        assert third.tokens_remaining == 15  # 25 used + 60 reserved
        assert third.reservation is not None
        await limiter.settle(third.reservation, limits, 0)
        await limiter.settle(third.reservation, limits, 0)  # settling twice changes nothing
        assert (await limiter.acquire("key", limits, reserve=75)).allowed, "exactly the rest fits"
        # The reservation left the window at its own time (0 s), with its settled count.
        clock.now = 60
        assert (await limiter.acquire("key", limits, reserve=25)).tokens_remaining == 0

    run(scenario())


def test_a_refused_reservation_says_when_enough_tokens_are_free() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = Limits(requests=None, tokens=100, window_seconds=60)
    charge(limiter, clock, 0, limits, 50)
    charge(limiter, clock, 10, limits, 30)
    decision = at(limiter, clock, 20, limits, reserve=40)
    assert not decision.allowed
    # 80 used; 40 fit once the charge of 0 s (50) has left, at 60 s: 40 s from now.
    assert decision.retry_after_seconds == 40
