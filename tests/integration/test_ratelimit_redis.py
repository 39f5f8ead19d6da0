"""The Redis limiter against a real redis-server: atomicity, window edges on Redis's clock, one round trip, outages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast
from unittest.mock import patch

import pytest
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from modelfleet.server.ratelimit import Decision, Limits, RateLimiterUnavailable, RedisRateLimiter
from tests.conftest import RedisServer, redis_answers_ping
from tests.support.procs import running_process

pytestmark = [pytest.mark.integration, pytest.mark.timeout(45)]

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, timeout)

    return asyncio.run(bounded())


def client_for(server: RedisServer) -> redis.asyncio.Redis:
    # No retries and short timeouts: an outage must show at once, not after the default backoff.
    return redis.asyncio.Redis(
        host=server.host, port=server.port, socket_timeout=2, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )


async def with_limiter(
    server: RedisServer,
    scenario: Callable[[RedisRateLimiter, redis.asyncio.Redis], Awaitable[T]],
    fail_open: bool = True,
) -> T:
    client = client_for(server)
    limiter = RedisRateLimiter(client, fail_open=fail_open)
    try:
        return await scenario(limiter, client)
    finally:
        await limiter.aclose()
        await client.aclose()


def test_concurrent_acquires_admit_exactly_the_limit(redis_server: RedisServer) -> None:
    limits = Limits(requests=10, tokens=None, window_seconds=2)

    async def scenario(limiter: RedisRateLimiter, client: redis.asyncio.Redis) -> None:
        decisions = await asyncio.gather(*(limiter.acquire("crowd", limits) for _ in range(50)))
        assert sum(d.allowed for d in decisions) == 10
        assert sorted(d.requests_remaining or 0 for d in decisions if d.allowed) == list(range(10))
        assert all(d.exceeded == "requests" and d.retry_after_seconds >= 1 for d in decisions if not d.allowed)
        assert await client.zcard(limiter.keys("crowd")[0]) == 10  # refusals left no trace

    run(with_limiter(redis_server, scenario))


def test_window_slides_without_a_burst_on_redis_clock(redis_server: RedisServer) -> None:
    window, limit = 1.0, 5
    limits = Limits(requests=limit, tokens=None, window_seconds=window)
    batches = 3

    async def scenario(limiter: RedisRateLimiter, client: redis.asyncio.Redis) -> None:
        request_log = limiter.keys("edge")[0]
        admitted: dict[bytes, int] = {}  # member -> admission time on Redis's clock (us)
        refusals = 0

        async def record() -> None:
            # The log keeps every admission for a whole window, so reading it after each one misses none.
            entries = cast(list[tuple[bytes, float]], await client.zrange(request_log, 0, -1, withscores=True))
            for member, score in entries:
                admitted[member] = int(score)

        async def hammer() -> None:
            # Until three batches were admitted (the window slid twice), however fast the machine is. It
            # asks without waiting for the limiter's own reset, so a window that frees slots too early is
            # caught; the short pause only bounds the rate of calls, nothing waits on it.
            while len(admitted) < batches * limit:
                decision = await limiter.acquire("edge", limits)
                if decision.allowed:
                    await record()
                else:
                    nonlocal refusals
                    refusals += 1
                await asyncio.sleep(0.002)

        first = [await limiter.acquire("edge", limits) for _ in range(limit)]
        assert all(d.allowed for d in first)
        await record()
        refused = await limiter.acquire("edge", limits)
        assert not refused.allowed
        assert 0 < refused.requests_reset_seconds <= window
        await asyncio.gather(*(hammer() for _ in range(4)))

        window_us = round(window * 1_000_000)
        times = sorted(admitted.values())
        busiest = max(sum(1 for s in times if s <= t < s + window_us) for t in times)
        assert busiest == limit
        # Each slide readmitted a full batch, no more; the first batch left the window together, so the
        # next ones come in batches too, a whole window apart on Redis's clock.
        assert len(times) >= batches * limit
        assert times[limit] - times[0] >= window_us
        assert times[2 * limit] - times[limit] >= window_us
        assert refusals > 0, "the hammering must have hit the limit"

    run(with_limiter(redis_server, scenario))


def test_reservations_fit_whole_and_settle_to_the_real_count_through_redis(redis_server: RedisServer) -> None:
    """As in process: 50 concurrent requests each reserving 30 of a 100-token budget admit exactly 3, and
    settling refunds what was not used, in the log and in the running sum."""
    limits = Limits(requests=None, tokens=100, window_seconds=30)

    async def scenario(limiter: RedisRateLimiter, client: redis.asyncio.Redis) -> None:
        _, token_log, token_sum = limiter.keys("reserve")
        decisions = await asyncio.gather(*(limiter.acquire("reserve", limits, reserve=30) for _ in range(50)))
        admitted = [decision for decision in decisions if decision.allowed]
        assert len(admitted) == 3, "no overshoot: 3 x 30 fit in 100, a fourth would not"
        assert int(await client.get(token_sum) or 0) == 90
        for decision in admitted:
            assert decision.reservation is not None
            await limiter.settle(decision.reservation, limits, 10)
        assert int(await client.get(token_sum) or 0) == 30
        members = cast(list[bytes], await client.zrange(token_log, 0, -1))
        assert sorted(int(member.split(b":")[0]) for member in members) == [10, 10, 10]
        # Settling again finds no reservation: nothing changes.
        await limiter.settle(admitted[0].reservation, limits, 0)  # type: ignore[arg-type]
        assert int(await client.get(token_sum) or 0) == 30
        assert (await limiter.acquire("reserve", limits, reserve=70)).allowed, "exactly the rest fits"
        assert not (await limiter.acquire("reserve", limits, reserve=1)).allowed

    run(with_limiter(redis_server, scenario))


def test_token_budget_is_enforced_through_redis(redis_server: RedisServer) -> None:
    limits = Limits(requests=None, tokens=50, window_seconds=1)

    async def scenario(limiter: RedisRateLimiter, client: redis.asyncio.Redis) -> None:
        _, token_log, token_sum = limiter.keys("tokens")
        assert (await limiter.acquire("tokens", limits)).tokens_remaining == 50
        await limiter.charge_tokens("tokens", limits, 20)
        await limiter.charge_tokens("tokens", limits, 20)
        partial = await limiter.acquire("tokens", limits)
        assert partial.allowed
        assert partial.tokens_remaining == 10
        assert partial.requests_remaining is None
        await limiter.charge_tokens("tokens", limits, 20)
        assert int(await client.get(token_sum) or 0) == 60
        assert await client.zcard(token_log) == 3

        refused = await limiter.acquire("tokens", limits)
        assert not refused.allowed
        assert refused.exceeded == "tokens"
        assert refused.tokens_remaining == 0
        assert refused.retry_after_seconds == 1
        # 60 >= 50 until the first 20 leave; then 40 < 50.
        assert 0 < refused.tokens_reset_seconds <= 1.0
        # Wait as long as the limiter says (its reset is on Redis's clock) and ask again, until admitted.
        after = refused
        while not after.allowed:
            await asyncio.sleep(after.tokens_reset_seconds)
            after = await limiter.acquire("tokens", limits)
        assert after.exceeded is None
        assert after.tokens_remaining in (10, 30, 50)  # the later charges may have left meanwhile too
        # The running sum was decremented by exactly what left the log.
        members = cast(list[bytes], await client.zrange(token_log, 0, -1))
        assert int(await client.get(token_sum) or 0) == sum(int(member.split(b":")[0]) for member in members)

    run(with_limiter(redis_server, scenario))


async def redis_clock_us(client: redis.asyncio.Redis) -> int:
    """Redis's own clock (TIME), in microseconds: the clock the limiter's scripts measure windows with."""
    seconds, microseconds = await client.time()
    return int(seconds) * 1_000_000 + int(microseconds)


async def charged_at(client: redis.asyncio.Redis, token_log: str, cost: int) -> int:
    """When (Redis's clock, us) the charge of `cost` tokens was logged."""
    entries = cast(list[tuple[bytes, float]], await client.zrange(token_log, 0, -1, withscores=True))
    return next(int(score) for member, score in entries if int(member.split(b":")[0]) == cost)


def test_running_sum_drops_exactly_the_charges_that_left(redis_server: RedisServer) -> None:
    """A charge of 30, then one of 25 half a window later: once the 30 has left the window and the 25 has
    not, the running sum is exactly 25.

    Every acquire is placed on Redis's clock (TIME just before it and just after the reads that
    follow), so the test knows which state the script saw instead of assuming how fast this machine
    runs; an acquire that straddles a boundary is asked again.
    """
    window = 2.0
    limits = Limits(requests=None, tokens=50, window_seconds=window)
    window_us = round(window * 1_000_000)

    async def scenario(limiter: RedisRateLimiter, client: redis.asyncio.Redis) -> None:
        # Each state lasts half a window; a machine stalled for that long misses it, and tries again.
        for attempt in range(3):
            subject = f"partial-{attempt}"
            _, token_log, token_sum = limiter.keys(subject)
            await limiter.charge_tokens(subject, limits, 30)
            first = await charged_at(client, token_log, 30)
            # About half a window on Redis's clock; it need not be exact, the checks below place each
            # acquire on that clock.
            await asyncio.sleep(max(0, first + window_us // 2 - await redis_clock_us(client)) / 1_000_000)
            await limiter.charge_tokens(subject, limits, 25)
            second = await charged_at(client, token_log, 25)

            before = await redis_clock_us(client)
            refused = await limiter.acquire(subject, limits)
            after = await redis_clock_us(client)
            if after >= first + window_us:
                continue  # the 30 may have left already: this attempt saw no state with both
            assert refused.exceeded == "tokens"  # 55 >= 50 until the 30 leaves
            # The reset is when the 30 leaves, counted from the script's own instant (within before..after).
            reset_us = refused.tokens_reset_seconds * 1_000_000
            assert first + window_us - after <= round(reset_us) <= first + window_us - before
            assert 0 < refused.tokens_reset_seconds <= window / 2

            wait = refused.tokens_reset_seconds
            while True:
                await asyncio.sleep(wait)
                before = await redis_clock_us(client)
                decision = await limiter.acquire(subject, limits)
                in_log = await client.zcard(token_log)
                running_sum = int(await client.get(token_sum) or 0)
                after = await redis_clock_us(client)
                if before >= second + window_us:
                    break  # both have left: too late for this attempt
                if after < first + window_us:
                    # Still before the 30 leaves (the sleep may end a hair early): both are in the log.
                    assert decision.exceeded == "tokens"
                    wait = decision.tokens_reset_seconds
                    continue
                if before < first + window_us or after >= second + window_us:
                    wait = 0  # this acquire straddled a boundary: which side it saw is unknown, so ask again
                    continue
                # The 30 has left, the 25 (charged half a window later) has not.
                assert decision.allowed
                assert decision.tokens_remaining == 25
                assert in_log == 1
                assert running_sum == 25
                return
        pytest.fail("three attempts never observed the state between the two charges leaving the window")

    run(with_limiter(redis_server, scenario))


def test_lost_running_sum_is_rebuilt_from_the_log(redis_server: RedisServer) -> None:
    limits = Limits(requests=None, tokens=50, window_seconds=2)

    async def scenario(limiter: RedisRateLimiter, client: redis.asyncio.Redis) -> None:
        _, _, token_sum = limiter.keys("rebuild")
        await limiter.charge_tokens("rebuild", limits, 30)
        await limiter.charge_tokens("rebuild", limits, 25)
        await client.delete(token_sum)
        refused = await limiter.acquire("rebuild", limits)
        assert refused.exceeded == "tokens"
        assert int(await client.get(token_sum) or 0) == 55
        assert 0 < await client.pttl(token_sum) <= 2000

    run(with_limiter(redis_server, scenario))


def command_calls(info: dict[str, Any]) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()}


def test_each_call_is_one_script_round_trip(redis_server: RedisServer) -> None:
    limits = Limits(requests=3, tokens=100, window_seconds=2)

    async def scenario(limiter: RedisRateLimiter, client: redis.asyncio.Redis) -> None:
        await limiter.acquire("warm", limits)  # loads the scripts (NOSCRIPT, SCRIPT LOAD, EVALSHA) once
        await limiter.charge_tokens("warm", limits, 1)
        sent: list[str] = []
        original: Callable[..., Awaitable[Any]] = client.execute_command

        async def counting(*args: Any, **options: Any) -> Any:
            sent.append(str(args[0]))
            return await original(*args, **options)

        async with redis.asyncio.Redis(host=redis_server.host, port=redis_server.port) as admin:
            await admin.config_resetstat()
            # Each execute_command is one request and its reply, whatever the command.
            with patch.object(client, "execute_command", counting):
                decisions = [await limiter.acquire("counted", limits) for _ in range(8)]
                for _ in range(4):
                    await limiter.charge_tokens("counted", limits, 10)
            calls = command_calls(await admin.info("commandstats"))

        assert [d.allowed for d in decisions] == [True] * 3 + [False] * 5
        assert sent == ["EVALSHA"] * 12
        assert calls["evalsha"] == 12
        assert "eval" not in calls
        assert not {"script", "script|load", "multi", "exec"} & calls.keys()

    run(with_limiter(redis_server, scenario))


def test_keys_expire_after_the_window(redis_server: RedisServer) -> None:
    limits = Limits(requests=5, tokens=100, window_seconds=0.5)

    async def scenario(limiter: RedisRateLimiter, client: redis.asyncio.Redis) -> None:
        keys = limiter.keys("idle")
        assert (await limiter.acquire("idle", limits)).allowed
        await limiter.charge_tokens("idle", limits, 7)
        assert await client.exists(*keys) == 3
        ttls = [await client.pttl(key) for key in keys]
        assert all(0 < ttl <= 500 for ttl in ttls), ttls
        # Redis said each key expires `ttl` ms after it was asked (the last ask is the latest); a key is
        # gone once Redis's clock is past that, so wait that long plus Redis's millisecond rounding.
        await asyncio.sleep((max(ttls) + 2) / 1000)
        assert await client.exists(*keys) == 0

    run(with_limiter(redis_server, scenario))


def test_fail_open_admits_degraded_while_redis_is_down(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limits = Limits(requests=1, tokens=10, window_seconds=2)

    async def scenario(limiter: RedisRateLimiter, client: redis.asyncio.Redis) -> list[Decision]:
        assert (await limiter.acquire("down", limits)).allowed
        assert limiter.healthy
        redis_server.process.stop()
        decisions = [await limiter.acquire("down", limits) for _ in range(3)]
        await limiter.charge_tokens("down", limits, 5)  # swallowed
        assert not limiter.healthy
        return decisions

    with caplog.at_level(logging.DEBUG, logger="modelfleet.server.ratelimit"):
        decisions = run(with_limiter(redis_server, scenario, fail_open=True))
    # Limit 1 was used up, yet all pass: the store is gone and the policy is to fail open.
    assert all(d.allowed and d.degraded for d in decisions)
    assert decisions[0].requests_limit == 1
    assert decisions[0].requests_remaining is None
    assert decisions[0].tokens_remaining is None
    assert decisions[0].retry_after_seconds == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "fail open" in warnings[0].getMessage()


def test_fail_closed_raises_while_redis_is_down(redis_server: RedisServer) -> None:
    limits = Limits(requests=5, tokens=None, window_seconds=2)

    async def scenario(limiter: RedisRateLimiter, client: redis.asyncio.Redis) -> None:
        assert (await limiter.acquire("closed", limits)).allowed
        redis_server.process.stop()
        with pytest.raises(RateLimiterUnavailable) as refused:
            await limiter.acquire("closed", limits)
        # It failed on the refused connection itself, not after waiting out a timeout.
        cause = refused.value.__cause__
        assert isinstance(cause, redis.exceptions.ConnectionError), repr(cause)
        assert not isinstance(cause, redis.exceptions.TimeoutError), repr(cause)
        assert not limiter.healthy
        await limiter.charge_tokens("closed", Limits(requests=None, tokens=5), 3)  # never raises

    run(with_limiter(redis_server, scenario, fail_open=False))


def test_recovers_when_redis_is_back_on_the_same_port(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limits = Limits(requests=2, tokens=None, window_seconds=2)
    argv = [str(arg) for arg in redis_server.process.process.args]  # type: ignore[union-attr]
    port = redis_server.port

    async def scenario(limiter: RedisRateLimiter, client: redis.asyncio.Redis) -> None:
        assert (await limiter.acquire("back", limits)).allowed
        redis_server.process.stop()
        with pytest.raises(RateLimiterUnavailable):
            await limiter.acquire("back", limits)
        assert not limiter.healthy
        # Same argv, so same port: the client reconnects on its own.  (The wait blocks the loop
        # briefly, which nothing here minds.)
        with running_process(
            "redis-again", argv, redis_server.data_dir / "again", ready=lambda: redis_answers_ping(port)
        ):
            decisions = [await limiter.acquire("back", limits) for _ in range(3)]
            assert limiter.healthy
        # A fresh server has an empty log: two admitted, the third refused as before the outage.
        assert [d.allowed for d in decisions] == [True, True, False]
        assert not any(d.degraded for d in decisions)

    with caplog.at_level(logging.INFO, logger="modelfleet.server.ratelimit"):
        run(with_limiter(redis_server, scenario, fail_open=False))
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in levels] == [logging.WARNING, logging.INFO]
    assert "fail closed" in levels[0][1]
    assert "available again" in levels[1][1]
