"""Operator settings that are logic, not plain values."""

from __future__ import annotations

import pytest

from modelfleet.operator.settings import OperatorSettings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("pod_name", "priority", "expected"),
    [("modelfleet-operator-0", None, 100), ("modelfleet-operator-1", None, 99), ("laptop", None, 0),
     ("", None, 0), ("modelfleet-operator-1", 7, 7)],
)  # fmt: skip
def test_replicas_get_distinct_peering_priorities(pod_name: str, priority: int | None, expected: int) -> None:
    """Kopf freezes every peer when two share the highest priority, so StatefulSet ordinals must differ."""
    assert OperatorSettings(pod_name=pod_name, priority=priority).peering_priority() == expected
