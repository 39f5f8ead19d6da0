"""The router's remembered metric children stay exported across a model's removal and return."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from modelfleet.server.metrics import RouterMetrics

pytestmark = pytest.mark.unit


def exported(metrics: RouterMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_a_child_is_made_once_and_counts_like_labels() -> None:
    metrics = RouterMetrics.create()
    first = metrics.child(metrics.requests, "m", "/v1/chat/completions", "2xx")
    assert metrics.child(metrics.requests, "m", "/v1/chat/completions", "2xx") is first
    first.inc()
    assert metrics.requests.labels(model="m", route="/v1/chat/completions", status_class="2xx")._value.get() == 1


def test_a_model_removed_then_added_back_is_exported_again() -> None:
    metrics = RouterMetrics.create()
    metrics.child(metrics.in_flight, "m").set(3)
    metrics.child(metrics.queue_depth, "m", "ns").set(2)
    metrics.child(metrics.in_flight, "other").set(1)
    metrics.forget_model("m", "ns")
    assert 'modelfleet_in_flight_requests{model="m"}' not in exported(metrics)
    metrics.child(metrics.in_flight, "m").set(5)
    metrics.child(metrics.queue_depth, "m", "ns").set(4)
    text = exported(metrics)
    assert 'modelfleet_in_flight_requests{model="m"} 5.0' in text
    assert 'modelfleet_queue_depth{model="m",namespace="ns"} 4.0' in text
    assert 'modelfleet_in_flight_requests{model="other"} 1.0' in text
