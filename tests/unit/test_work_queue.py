"""The controller's work queue: one sync of a model at a time, and a burst during it costs one more."""

from __future__ import annotations

import pytest

from modelfleet.operator.controller import WorkQueue

pytestmark = pytest.mark.unit


def test_a_key_is_synced_by_one_worker_and_a_burst_during_it_costs_one_more_sync() -> None:
    queue = WorkQueue()
    key = ("models", "gemma")
    assert queue.start(key) is True
    # Three events arrive while it syncs: the other workers leave it to the one at it.
    assert [queue.start(key) for _ in range(3)] == [False, False, False]
    assert queue.done(key) is True, "dirtied during the sync: once more"
    assert queue.done(key) is False, "nothing new meanwhile: done"
    assert queue.start(key) is True, "a later event starts a new sync"


def test_other_keys_are_independent_and_a_failed_sync_leaves_nothing_pending() -> None:
    queue = WorkQueue()
    a, b = ("ns", "a"), ("ns", "b")
    assert (queue.start(a), queue.start(b)) == (True, True)
    assert queue.start(a) is False
    queue.forget(a)
    assert queue.start(a) is True, "a failed sync does not block the next one"
    assert queue.done(a) is False
    assert queue.done(b) is False
