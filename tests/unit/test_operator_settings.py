"""Operator settings that are logic, not plain values."""

from __future__ import annotations

import kopf
import pytest

from modelfleet.operator import handlers
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


def test_children_are_watched_by_label_on_the_api_servers_side() -> None:
    """Kopf passes these selectors to the watch requests: only the operator's children are streamed."""
    settings = kopf.OperatorSettings()
    handlers.configure(settings, OperatorSettings(standalone=True))
    for group, version, plural in handlers.CHILD_RESOURCES:
        assert settings.watching.label_selectors.collect(kopf.Resource(group, version, plural)) == [
            "app.kubernetes.io/managed-by=modelfleet-operator"
        ], plural
    # Not the models themselves, which carry no such label, nor Kopf's peering objects.
    selectors = settings.watching.label_selectors
    assert selectors.collect(kopf.Resource("modelfleet.io", "v1alpha1", "inferencemodels")) == []
    assert selectors.collect(kopf.Resource("kopf.dev", "v1", "kopfpeerings")) == []
