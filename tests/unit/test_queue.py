"""Per-model admission: slots, a bounded FIFO queue, 429 with Retry-After, timeouts and cancellation."""

from __future__ import annotations

import asyncio

import pytest

from modelfleet.server.errors import RouterError
from modelfleet.server.metrics import RouterMetrics
from modelfleet.server.queue import Claim, ModelQueue

pytestmark = pytest.mark.unit


def gauge(metrics: RouterMetrics, name: str) -> float:
    labels = {"model": "m", "namespace": ""} if name == "modelfleet_queue_depth" else {"model": "m"}
    value = metrics.registry.get_sample_value(name, labels)
    return value if value is not None else 0.0


async def hold(queue: ModelQueue, order: list[int], index: int, release: asyncio.Event) -> None:
    async with queue.slot(max_wait_seconds=10):
        order.append(index)
        await release.wait()


def test_one_runs_two_wait_the_fourth_gets_429_and_waiters_run_in_order() -> None:
    async def scenario() -> None:
        metrics = RouterMetrics.create()
        queue = ModelQueue("m", capacity=1, max_queue=2, metrics=metrics)
        order: list[int] = []
        releases = [asyncio.Event() for _ in range(3)]
        tasks = [asyncio.create_task(hold(queue, order, i, releases[i])) for i in range(3)]
        await asyncio.sleep(0.01)
        assert (queue.in_flight, queue.depth) == (1, 2)
        assert gauge(metrics, "modelfleet_in_flight_requests") == 1
        assert gauge(metrics, "modelfleet_queue_depth") == 2
        with pytest.raises(RouterError) as refused:
            async with queue.slot(max_wait_seconds=10):
                pass
        assert refused.value.status == 429
        assert refused.value.code == "queue_full"
        assert int(refused.value.headers["retry-after"]) >= 1
        for release in releases:
            release.set()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2]
        assert (queue.in_flight, queue.depth) == (0, 0)
        assert gauge(metrics, "modelfleet_in_flight_requests") == 0
        assert gauge(metrics, "modelfleet_queue_depth") == 0

    asyncio.run(scenario())


def test_a_waiter_that_times_out_or_is_cancelled_leaves_the_queue() -> None:
    async def scenario() -> None:
        metrics = RouterMetrics.create()
        queue = ModelQueue("m", capacity=1, max_queue=5, metrics=metrics)
        release = asyncio.Event()
        holder = asyncio.create_task(hold(queue, [], 0, release))
        await asyncio.sleep(0.01)
        with pytest.raises(RouterError) as timed_out:
            async with queue.slot(max_wait_seconds=0.05):
                pass
        assert (timed_out.value.status, timed_out.value.code) == (504, "queue_timeout")
        assert queue.depth == 0

        cancelled = asyncio.create_task(hold(queue, [], 1, asyncio.Event()))
        await asyncio.sleep(0.01)
        assert queue.depth == 1
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert queue.depth == 0
        release.set()
        await holder
        assert (queue.in_flight, queue.depth) == (0, 0)
        # The freed slot is usable at once.
        async with queue.slot(max_wait_seconds=0.05):
            assert queue.in_flight == 1

    asyncio.run(scenario())


def test_max_queue_zero_refuses_as_soon_as_slots_are_taken() -> None:
    async def scenario() -> None:
        queue = ModelQueue("m", capacity=2, max_queue=0, metrics=RouterMetrics.create())
        async with queue.slot(1), queue.slot(1):
            with pytest.raises(RouterError, match="Too many requests"):
                async with queue.slot(1):
                    pass

    asyncio.run(scenario())


def test_zero_capacity_waits_and_new_capacity_starts_waiters_in_order() -> None:
    async def scenario() -> None:
        metrics = RouterMetrics.create()
        queue = ModelQueue("m", capacity=0, max_queue=5, metrics=metrics)
        tickets = [queue.admit() for _ in range(3)]
        assert not any(ticket.granted for ticket in tickets)
        assert (queue.in_flight, queue.depth) == (0, 3)
        queue.set_capacity(2)
        assert [ticket.granted for ticket in tickets] == [True, True, False]
        assert (queue.in_flight, queue.depth) == (2, 1)
        assert gauge(metrics, "modelfleet_queue_depth") == 1
        await tickets[0].wait(1)
        tickets[0].release()
        assert tickets[2].granted, "a freed slot goes to the next in line"
        for ticket in tickets:
            ticket.release()
        assert (queue.in_flight, queue.depth) == (0, 0)

    asyncio.run(scenario())


def test_closing_fails_every_waiter_at_once() -> None:
    async def scenario() -> None:
        queue = ModelQueue("m", capacity=0, max_queue=5, metrics=RouterMetrics.create())
        waiting = [asyncio.create_task(queue.admit().wait(30)) for _ in range(2)]
        await asyncio.sleep(0.01)
        queue.close("The model `m` was removed.")
        for task in waiting:
            with pytest.raises(RouterError) as gone:
                await task
            assert (gone.value.status, gone.value.code) == (404, "model_not_found")
        with pytest.raises(RouterError):
            queue.admit()
        assert (queue.in_flight, queue.depth) == (0, 0)

    asyncio.run(scenario())


def grant_order(claims: list[Claim], capacity: int = 1) -> list[str]:
    """The subjects of waiting requests in the order they get a slot, one slot freed at a time.

    Every request waits: the first caller's request holds the slots, as the head of a flood does;
    then slots are handed back one by one.
    """

    async def scenario() -> list[str]:
        queue = ModelQueue("m", capacity=capacity, max_queue=1000, metrics=RouterMetrics.create())
        blockers = [queue.admit(claims[0]) for _ in range(capacity)]
        assert all(ticket.granted for ticket in blockers)
        tickets = [(claim.subject, queue.admit(claim)) for claim in claims]
        order: list[str] = []
        for _ in claims:
            blockers.pop().release()
            started = [(subject, ticket) for subject, ticket in tickets if ticket.granted]
            assert len(started) == 1, "each freed slot goes to exactly one waiting request"
            subject, ticket = started[0]
            tickets.remove((subject, ticket))
            order.append(subject)
            blockers.append(ticket)
        return order

    return asyncio.run(scenario())


def test_a_flooding_key_does_not_starve_a_light_one() -> None:
    order = grant_order([Claim("a")] * 10 + [Claim("b")])
    assert order.index("b") == 0, f"b waited behind the flood: {order}"


def test_weights_share_the_slots() -> None:
    order = grant_order([Claim("heavy", weight=2)] * 12 + [Claim("light", weight=1)] * 12)
    first = order[:12]
    assert first.count("heavy") == 8, f"2:1 while both wait: {order}"


def test_one_caller_is_served_in_arrival_order() -> None:
    async def scenario() -> list[int]:
        queue = ModelQueue("m", capacity=1, max_queue=100, metrics=RouterMetrics.create())
        order: list[int] = []
        release = asyncio.Event()
        tasks = [asyncio.create_task(hold(queue, order, index, release)) for index in range(6)]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == list(range(6))


def test_interactive_requests_start_before_batch_ones() -> None:
    order = grant_order([Claim("nightly", priority="batch")] * 3 + [Claim("user", priority="interactive")] * 2)
    assert order == ["user", "user", "nightly", "nightly", "nightly"]


def test_callers_that_give_up_do_not_grow_the_line_without_bound() -> None:
    async def scenario() -> int:
        queue = ModelQueue("m", capacity=0, max_queue=10, metrics=RouterMetrics.create())
        for _ in range(1000):
            queue.admit(Claim("impatient")).release()
        assert queue.depth == 0
        return len(queue._line)

    assert asyncio.run(scenario()) <= 64 + 2


def test_a_request_that_cannot_start_before_its_deadline_is_refused_at_once() -> None:
    async def scenario() -> None:
        metrics = RouterMetrics.create()
        queue = ModelQueue("m", capacity=1, max_queue=100, metrics=metrics)
        assert queue.admit().granted
        # Unknown durations: nothing is shed yet.
        assert not queue.admit(max_wait_seconds=0.001).granted
        for _ in range(ModelQueue.SHED_AFTER_SAMPLES):
            queue._recent_durations.append(10.0)
        # One ahead of it (the waiting one), one running: two 10 s waves > 15 s.
        with pytest.raises(RouterError) as shed:
            queue.admit(max_wait_seconds=15)
        assert (shed.value.status, shed.value.code) == (429, "queue_deadline")
        assert int(shed.value.headers["retry-after"]) >= 1
        assert queue.depth == 1, "a shed request takes no place in line"
        assert not queue.admit(max_wait_seconds=25).granted, "it fits in 25 s"
        assert (
            metrics.registry.get_sample_value(
                "modelfleet_rejected_requests_total", {"model": "m", "reason": "queue_deadline"}
            )
            == 1
        )
        # With no replica, requests wait for one to come up, not for each other: never shed.
        idle = ModelQueue("idle", capacity=0, max_queue=100, metrics=metrics)
        idle._recent_durations.extend([10.0] * ModelQueue.SHED_AFTER_SAMPLES)
        assert not idle.admit(max_wait_seconds=0.001).granted

    asyncio.run(scenario())


def test_the_fifo_policy_keeps_arrival_order_whoever_asks() -> None:
    async def scenario() -> list[str]:
        queue = ModelQueue("m", capacity=1, max_queue=100, metrics=RouterMetrics.create(), fair=False)
        running = queue.admit()
        tickets = [
            (claim.subject, queue.admit(claim)) for claim in [Claim("a")] * 3 + [Claim("b", priority="interactive")]
        ]
        order = []
        for _ in tickets:
            running.release()
            subject, running = next((s, t) for s, t in tickets if t.granted and (s, t) not in order)
            order.append((subject, running))
        return [subject for subject, _ in order]

    assert asyncio.run(scenario()) == ["a", "a", "a", "b"]
