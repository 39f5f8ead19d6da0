"""The admission queue's rules in detail: its errors and metrics, the Retry-After hint and the expected wait,
the slot of a request that gave up just as it was granted, and the line's bound."""

from __future__ import annotations

import asyncio

import pytest

from modelfleet.server.errors import RouterError
from modelfleet.server.metrics import RouterMetrics
from modelfleet.server.queue import Claim, ModelQueue

pytestmark = pytest.mark.unit


def sample(metrics: RouterMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model": "m", **labels})


def test_a_full_line_refuses_with_429_counted_as_queue_full() -> None:
    async def scenario() -> None:
        metrics = RouterMetrics.create()
        queue = ModelQueue("m", capacity=1, max_queue=0, metrics=metrics)
        queue.admit()
        with pytest.raises(RouterError) as refused:
            queue.admit()
        error = refused.value
        assert (error.status, error.type, error.code) == (429, "rate_limit_error", "queue_full")
        assert error.message == "Too many requests are waiting for `m`; retry later."
        assert sample(metrics, "modelfleet_rejected_requests_total", reason="queue_full") == 1
        assert sample(metrics, "modelfleet_admission_slots") == 1

    asyncio.run(scenario())


def test_a_wait_past_the_deadline_fails_with_504_at_once_counted_as_queue_timeout() -> None:
    async def scenario() -> None:
        metrics = RouterMetrics.create()
        queue = ModelQueue("m", capacity=1, max_queue=5, metrics=metrics)
        queue.admit()
        waiting = queue.admit()
        with pytest.raises(RouterError) as timed_out:
            # A deadline of 0 gives up now: the outer bound only catches a wait that would not.
            await asyncio.wait_for(waiting.wait(0), 0.5)
        error = timed_out.value
        assert (error.status, error.type, error.code) == (504, "timeout_error", "queue_timeout")
        assert error.message == "Waited 0s for `m` without a free slot."
        assert sample(metrics, "modelfleet_rejected_requests_total", reason="queue_timeout") == 1
        assert queue.depth == 0

    asyncio.run(scenario())


def test_the_time_in_line_is_returned_and_observed_per_model() -> None:
    async def scenario() -> None:
        metrics = RouterMetrics.create()
        queue = ModelQueue("m", capacity=1, max_queue=5, metrics=metrics)
        waited = await queue.admit().wait(10)
        assert 0 <= waited < 5
        assert sample(metrics, "modelfleet_queue_wait_seconds_count") == 1

    asyncio.run(scenario())


def test_closing_fails_waiting_and_new_requests_with_404_and_the_reason() -> None:
    async def scenario() -> None:
        queue = ModelQueue("m", capacity=1, max_queue=5, metrics=RouterMetrics.create())
        queue.admit()
        waiting = queue.admit()
        queue.close("`m` was deleted")
        with pytest.raises(RouterError) as closed:
            await waiting.wait(10)
        error = closed.value
        assert (error.status, error.type, error.code) == (404, "not_found_error", "model_not_found")
        assert error.message == "`m` was deleted"
        with pytest.raises(RouterError) as refused:
            queue.admit()
        assert (refused.value.status, refused.value.message) == (404, "`m` was deleted")

    asyncio.run(scenario())


def test_retry_after_is_the_work_ahead_in_waves_of_the_capacity_at_the_median_duration() -> None:
    async def scenario() -> None:
        queue = ModelQueue("m", capacity=1, max_queue=10, metrics=RouterMetrics.create())
        assert queue.retry_after_seconds() == 1, "nothing ahead: at least one second"
        queue.admit()
        queue.admit()
        queue.admit()
        # One running, two waiting, one slot: three waves of the unknown duration, taken as 1 s.
        assert queue.retry_after_seconds() == 3
        queue._recent_durations.extend([1.0, 2.0, 3.0, 4.0, 5.0])
        assert queue.retry_after_seconds() == 9  # 3 waves x the median, 3 s
        queue.set_capacity(2)  # one more slot: a waiter starts, 2 running and 1 waiting make 1.5 waves
        assert (queue.in_flight, queue.depth) == (2, 1)
        assert queue.retry_after_seconds() == 5  # ceil(1.5 x 3)

    asyncio.run(scenario())


def test_the_expected_wait_counts_the_waves_ahead_of_a_place_in_line() -> None:
    async def scenario() -> None:
        queue = ModelQueue("m", capacity=2, max_queue=10, metrics=RouterMetrics.create())
        queue.admit()
        queue.admit()  # two running: the next tags are 2, 3 and 4
        waiting = [queue.admit() for _ in range(3)]
        assert queue.expected_wait_seconds(0, 4.0) is None, "too few durations to go by"
        queue._recent_durations.extend([8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0])  # median 5
        assert queue.expected_wait_seconds(0, 4.0) == 10.0  # 3 ahead (its own tag too) on 2 slots: 2 waves
        assert queue.expected_wait_seconds(0, 3.0) == 10.0  # 2 ahead: 2 waves
        assert queue.expected_wait_seconds(0, 1.0) == 5.0  # none ahead: 1 wave
        waiting[0].release()  # the request of tag 2 gave up: it is no longer ahead
        assert queue.expected_wait_seconds(0, 3.0) == 5.0

    asyncio.run(scenario())


def test_only_the_last_32_durations_count() -> None:
    queue = ModelQueue("m", capacity=1, max_queue=10, metrics=RouterMetrics.create())
    for duration in range(1, 34):
        queue.finished(float(duration))
        queue.in_flight = 0
    assert queue.expected_wait_seconds(0, 0.0) == 18.0  # the median of 2..33


def test_a_request_is_refused_only_when_its_expected_wait_exceeds_its_deadline() -> None:
    async def scenario() -> None:
        queue = ModelQueue("m", capacity=1, max_queue=10, metrics=RouterMetrics.create())
        queue.admit()
        queue.admit()
        queue._recent_durations.extend([10.0] * ModelQueue.SHED_AFTER_SAMPLES)
        assert not queue.admit(max_wait_seconds=20).granted, "exactly its deadline: it waits"
        with pytest.raises(RouterError) as shed:
            queue.admit(max_wait_seconds=15)
        assert shed.value.message == (
            "`m` is too busy to start this request within 15s (about 30s of work is ahead of it); retry later."
        )

    asyncio.run(scenario())


def test_released_slots_record_how_long_they_were_held() -> None:
    async def scenario() -> None:
        queue = ModelQueue("m", capacity=1, max_queue=10, metrics=RouterMetrics.create())
        for _ in range(ModelQueue.SHED_AFTER_SAMPLES):
            queue.admit().release()
        expected = queue.expected_wait_seconds(0, 0.0)
        assert expected is not None
        assert 0 <= expected < 5

    asyncio.run(scenario())


def test_a_new_caller_starts_before_a_flood_and_fifo_ignores_priority() -> None:
    async def scenario() -> None:
        queue = ModelQueue("m", capacity=1, max_queue=10, metrics=RouterMetrics.create())
        running = queue.admit(Claim("a"))
        flood = [queue.admit(Claim("a")) for _ in range(2)]
        newcomer = queue.admit(Claim("b"))
        running.release()
        assert newcomer.granted
        assert not any(ticket.granted for ticket in flood)
        # After a grant with others still waiting, the line goes on admitting.
        assert not queue.admit(Claim("c")).granted

        fifo = ModelQueue("f", capacity=1, max_queue=10, metrics=RouterMetrics.create(), fair=False)
        first = fifo.admit()
        batch = fifo.admit(Claim("x", priority="batch"))
        interactive = fifo.admit(Claim("y", priority="interactive"))
        first.release()
        assert (batch.granted, interactive.granted) == (True, False)

    asyncio.run(scenario())


def test_a_slot_granted_to_a_request_that_gave_up_passes_to_the_next() -> None:
    async def scenario() -> None:
        queue = ModelQueue("m", capacity=1, max_queue=10, metrics=RouterMetrics.create())
        running = queue.admit()
        late, next_one = queue.admit(), queue.admit()
        running.release()
        assert late.granted
        queue.abandon(late)  # its wait ended (deadline, disconnect) just as the slot came
        assert next_one.granted
        assert (queue.in_flight, queue.depth) == (1, 0)
        late.release()  # already given back: nothing more
        assert queue.in_flight == 1

    asyncio.run(scenario())


def test_a_request_that_left_the_line_is_skipped_when_a_slot_frees() -> None:
    async def scenario() -> None:
        queue = ModelQueue("m", capacity=1, max_queue=10, metrics=RouterMetrics.create())
        running = queue.admit()
        gone, waiting = queue.admit(), queue.admit()
        gone.release()
        running.release()
        assert waiting.granted
        assert queue.in_flight == 1

    asyncio.run(scenario())


def test_the_line_is_rebuilt_once_left_entries_outnumber_the_waiting_ones_by_64() -> None:
    async def scenario() -> None:
        queue = ModelQueue("m", capacity=0, max_queue=10, metrics=RouterMetrics.create())
        queue.admit(Claim("patient"))
        for _ in range(65):
            queue.admit(Claim("impatient")).release()
        assert len(queue._line) == 66  # 65 left entries and the waiting one: not more than 2 x 1 + 64
        queue.admit(Claim("impatient")).release()
        assert len(queue._line) == 1

    asyncio.run(scenario())


def test_re_admitting_an_open_queue_keeps_each_callers_place() -> None:
    async def scenario() -> list[str]:
        queue = ModelQueue("m", capacity=1, max_queue=10, metrics=RouterMetrics.create())
        running = queue.admit(Claim("a"))
        tickets = [("a1", queue.admit(Claim("a"))), ("a2", queue.admit(Claim("a")))]
        queue.refuse(None)  # discovery says the model is available: nothing changes for those waiting
        tickets += [("b", queue.admit(Claim("b"))), ("a3", queue.admit(Claim("a")))]
        order = []
        for _ in range(len(tickets)):
            running.release()
            name, running = next((name, ticket) for name, ticket in tickets if ticket.granted and name not in order)
            order.append(name)
        return order

    assert asyncio.run(scenario()) == ["b", "a1", "a2", "a3"]
