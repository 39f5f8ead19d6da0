"""The pinned Prometheus Operator CRDs make the API server judge ServiceMonitors and PrometheusRules.

The Helm chart's server-side dry runs rely on this: without the CRDs the API server refuses
any monitoring.coreos.com object as an unknown kind, and with them it must still refuse an
invalid one.  Everything here is `--dry-run=server`, so nothing is stored in the shared cluster.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.conftest import Cluster

pytestmark = pytest.mark.e2e

GROUP_VERSION = "monitoring.coreos.com/v1"
# Dry runs persist nothing, and `default` always exists: no namespace per test needed.
NAMESPACE = "default"


def service_monitor(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "ServiceMonitor",
        "metadata": {"name": "modelfleet-router", "namespace": NAMESPACE},
        "spec": spec,
    }


def prometheus_rule(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "PrometheusRule",
        "metadata": {"name": "modelfleet", "namespace": NAMESPACE},
        "spec": spec,
    }


VALID_SERVICE_MONITOR_SPEC: dict[str, Any] = {
    "selector": {"matchLabels": {"app.kubernetes.io/name": "modelfleet-router"}},
    "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s", "scheme": "http"}],
}
VALID_RULE: dict[str, Any] = {
    "alert": "ModelFleetRouterDown",
    "expr": 'up{job="modelfleet-router"} == 0',
    "for": "5m",
    "labels": {"severity": "critical"},
    "annotations": {"summary": "The ModelFleet router is down"},
}


def with_rule(**changes: Any) -> dict[str, Any]:
    """A PrometheusRule spec whose only rule is VALID_RULE with `changes` (None removes a key)."""
    rule = {key: value for key, value in (VALID_RULE | changes).items() if value is not None}
    return {"groups": [{"name": "modelfleet.rules", "rules": [rule]}]}


VALID: list[tuple[str, dict[str, Any]]] = [
    ("service monitor", service_monitor(VALID_SERVICE_MONITOR_SPEC)),
    ("alerting rule", prometheus_rule(with_rule())),
    ("recording rule", prometheus_rule(with_rule(alert=None, record="modelfleet:requests:rate5m",
                                                 expr="sum(rate(modelfleet_requests_total[5m]))", **{"for": None}))),
]  # fmt: skip

# (case, object, a fragment the API server's message must contain).  Each must be refused.
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("rule without expr", prometheus_rule(with_rule(expr=None)), "spec.groups[0].rules[0].expr: Required value"),
    ("rule with an unparsable for", prometheus_rule(with_rule(**{"for": "5 minutes"})),
     "spec.groups[0].rules[0].for in body should match"),
    ("group without name", prometheus_rule({"groups": [{"rules": [VALID_RULE]}]}),
     "spec.groups[0].name: Required value"),
    ("rules not a list", prometheus_rule({"groups": [{"name": "g", "rules": "up == 0"}]}),
     "spec.groups[0].rules in body must be of type array"),
    ("service monitor without selector",
     service_monitor({"endpoints": VALID_SERVICE_MONITOR_SPEC["endpoints"]}), "spec.selector: Required value"),
    ("endpoints not a list", service_monitor(VALID_SERVICE_MONITOR_SPEC | {"endpoints": "metrics"}),
     "spec.endpoints in body must be of type array"),
    ("unparsable scrape interval",
     service_monitor(VALID_SERVICE_MONITOR_SPEC | {"endpoints": [{"port": "metrics", "interval": "30 seconds"}]}),
     "spec.endpoints[0].interval in body should match"),
    ("unknown scheme", service_monitor(VALID_SERVICE_MONITOR_SPEC | {"endpoints": [{"port": "metrics",
                                                                                      "scheme": "ftp"}]}),
     'spec.endpoints[0].scheme: Unsupported value: "ftp"'),
    # A misspelt field (endpoint for endpoints) is refused, not silently dropped, with strict field validation.
    ("unknown field", service_monitor(VALID_SERVICE_MONITOR_SPEC | {"endpoint": []}), 'unknown field "spec.endpoint"'),
]  # fmt: skip


def dry_run(cluster: Cluster, document: dict[str, Any]) -> tuple[bool, str]:
    result = cluster.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", "-",
        check=False, input_text=json.dumps(document),
    )  # fmt: skip
    return result.returncode == 0, (result.stdout + result.stderr).strip()


def test_the_monitoring_crds_are_established(cluster: Cluster, prometheus_operator_crds: list[str]) -> None:
    for name in ("servicemonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com",
                 "podmonitors.monitoring.coreos.com"):  # fmt: skip
        assert name in prometheus_operator_crds
        established = cluster.kubectl(
            "get", "crd", name, "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}"
        ).stdout
        assert established == "True", name


@pytest.mark.parametrize(("case", "document"), VALID, ids=[case for case, _ in VALID])
def test_valid_objects_are_accepted(
    cluster: Cluster, prometheus_operator_crds: list[str], case: str, document: dict[str, Any]
) -> None:
    accepted, output = dry_run(cluster, document)
    assert accepted, f"{case}: refused: {output}"
    assert "(server dry run)" in output


@pytest.mark.parametrize(("case", "document", "message"), INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_objects_are_refused(
    cluster: Cluster, prometheus_operator_crds: list[str], case: str, document: dict[str, Any], message: str
) -> None:
    accepted, output = dry_run(cluster, document)
    assert not accepted, f"{case}: accepted: {output}"
    assert message in output, f"{case}: the API server's message does not say {message!r}: {output}"
