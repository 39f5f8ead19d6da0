"""The chart's observability content: alerts, prometheus-adapter rules and the Grafana dashboard.

promtool checks and unit-tests the alerts; then a real Prometheus scrapes the real router in front
of the real Ollama, and every dashboard, alert and adapter query must evaluate there, with the key
panels showing data. Grafana and prometheus-adapter are not run: their substitutions are emulated.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from modelfleet.operator.builders.autoscaling import ENGINE_QUEUE_METRIC, ROUTER_QUEUE_METRIC
from tests.conftest import PrometheusServer, RouterServer, require_binary
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "modelfleet"
ALERTS = CHART / "files" / "alerts.yaml"
ADAPTER_RULES = CHART / "files" / "adapter-rules.yaml"
DASHBOARD = CHART / "dashboards" / "modelfleet.json"
ALERTS_TEST = Path(__file__).parent / "data" / "alerts_test.yaml"

MODEL = "gemma3:270m"
NAMESPACE = "team-a"
# Target labels that stand in for what the chart's ServiceMonitor provides: the Service labels the
# RouterDown alert selects on, and `namespace`, which the router will export for cluster-discovered
# models (kept by honorLabels) and the adapter's external rule matches on.
ROUTER_TARGET_LABELS = {
    "namespace": NAMESPACE,
    "app_kubernetes_io_part_of": "modelfleet",
    "app_kubernetes_io_component": "router",
}
# What Grafana substitutes; a range of 1m holds ~60 samples at the fixture's 1s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$model": ".*"}
REQUIRED_PANELS = {
    "Requests/s by status class",
    "Errors/s",
    "Latency (not cached: miss, bypass)",
    "Latency (cached: hit, coalesced)",
    "Time to first token",
    "Tokens/s",
    "Generation speed per request",
    "Queue depth and in flight",
    "Queue wait",
    "Cache hit ratio",
    "Rate-limited requests/s",
    "Ready replicas",
}
# The one panel of router-wide metrics, which have no model label.
UNLABELLED_PANEL = "Cache store"
# Panels that must show a number once the router has answered plain and streamed requests.
KEY_PANELS = (
    "Requests/s by status class",
    "Latency (not cached: miss, bypass)",
    "Time to first token",
    "Tokens/s",
    "Queue depth and in flight",
)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def grafana_expr(expr: str) -> str:
    # Longest names first: $__rate_interval must not be cut by $__interval.
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"unknown dashboard variable left in {expr!r}"
    return expr


def adapter_query(template: str, series: str, label_matchers: str, group_by: str) -> str:
    """prometheus-adapter's metricsQuery rendering: a Go template with << >> delimiters."""

    values = {"Series": series, "LabelMatchers": label_matchers, "GroupBy": group_by}

    def field(match: re.Match[str]) -> str:
        assert match.group(1) in values, f"template action {match.group(0)!r} is not emulated here"
        return values[match.group(1)]

    rendered = re.sub(r"<<\s*\.(\w+)\s*>>", field, template)
    assert "<<" not in rendered, f"unsupported template syntax in {template!r}"
    return rendered


def adapter_metric_name(rule: dict[str, Any], series: str) -> str | None:
    """The API name the adapter gives a series: `name.matches` and `name.as`, as Go's Regexp.Expand."""
    match = re.search(rule["name"]["matches"], series)
    if match is None:
        return None
    return re.sub(r"\$\{?(\d+)\}?", lambda ref: match.group(int(ref.group(1))), rule["name"]["as"])


def test_promtool_accepts_the_alert_rules() -> None:
    promtool = require_binary("promtool", "run `make install` (Debian package prometheus)")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_show_each_alert_firing_and_staying_quiet() -> None:
    promtool = require_binary("promtool", "run `make install` (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr

    checks = [check for case in load_yaml(ALERTS_TEST)["tests"] for check in case["alert_rule_test"]]
    for rule in alert_rules():
        name = rule["alert"]
        assert any(c["alertname"] == name and c["exp_alerts"] for c in checks), f"{name} is never shown firing"
        assert any(c["alertname"] == name and not c["exp_alerts"] for c in checks), f"{name} is never shown quiet"
        assert rule.get("for"), f"{name} has no `for`"
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert {"summary", "description"} <= rule["annotations"].keys()


def test_the_dashboard_is_grafana_json_with_per_model_panels_on_the_datasource_variable() -> None:
    board = dashboard()
    assert board["uid"] == "modelfleet-router"
    assert board["schemaVersion"] >= 38
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query"
    assert model["multi"] is True
    assert model["includeAll"] is True
    assert "label_values(modelfleet_requests_total, model)" in json.dumps(model["query"])

    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    missing = REQUIRED_PANELS - {panel["title"] for panel in panels}
    assert not missing, f"panels missing: {missing}"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}", panel["title"]
            if panel["title"] != UNLABELLED_PANEL:
                assert 'model=~"$model"' in target["expr"], f"{panel['title']}: {target['expr']} ignores $model"


def test_the_adapter_rules_serve_the_metric_names_the_operators_hpas_ask_for() -> None:
    rules = load_yaml(ADAPTER_RULES)
    [external] = rules["externalRules"]
    assert adapter_metric_name(external, "modelfleet_queue_depth") == ROUTER_QUEUE_METRIC
    # Namespaced: the adapter adds the HPA's namespace, so an HPA cannot read another namespace's queue.
    assert external["resources"]["namespaced"] is True
    assert external["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    [engine] = rules["rules"]
    assert adapter_metric_name(engine, "vllm:num_requests_waiting") == ENGINE_QUEUE_METRIC
    assert engine["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


@dataclass
class ScrapingPrometheus:
    server: PrometheusServer
    router: RouterServer

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.server.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", f"{expr}\n  -> {body.get('errorType')}: {body.get('error')}"
        assert body["data"]["resultType"] == "vector", expr
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def has_number(self, expr: str) -> bool:
        return any(math.isfinite(float(sample["value"][1])) for sample in self.query(expr))

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.server.url}/api/v1/{path}", params=params, timeout=10)
        response.raise_for_status()
        return response.json()["data"]

    def loaded_rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def active_alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def router_gauge(self, name: str) -> float:
        text = httpx.get(f"{self.router.base_url}/metrics", timeout=5).text
        prefix = f'{name}{{model="{MODEL}"'
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)]
        assert len(values) == 1, f"{prefix!r} not in the router's /metrics"
        return values[0]


@pytest.fixture
def scraping(prometheus_server: PrometheusServer, router_server: RouterServer) -> ScrapingPrometheus:
    """The fixture's Prometheus, now scraping the router every second and evaluating alerts.yaml."""
    config = load_yaml(prometheus_server.config_path)
    config["rule_files"] = [str(ALERTS)]
    config["scrape_configs"].append({
        "job_name": "modelfleet-router",
        "honor_labels": True,  # as the chart's ServiceMonitor must, to keep the router's `namespace`
        "static_configs": [{"targets": [urlsplit(router_server.base_url).netloc], "labels": ROUTER_TARGET_LABELS}],
        # The session router serves a static model, exported with namespace=""; a model discovered
        # from an InferenceModel carries its namespace. Give the static one the namespace it would have.
        "metric_relabel_configs": [{"source_labels": ["__name__", "namespace"], "regex": "modelfleet_queue_depth;",
                                    "target_label": "namespace", "replacement": NAMESPACE}],
    })  # fmt: skip
    prometheus_server.config_path.write_text(yaml.safe_dump(config))
    prometheus_server.reload()
    prometheus = ScrapingPrometheus(prometheus_server, router_server)
    # The router publishes its queue gauges at start, so the first scrape brings them.
    wait_until(
        lambda: bool(prometheus.query(f'modelfleet_queue_depth{{model="{MODEL}"}}')),
        timeout=30,
        on_timeout=lambda: f"(targets: {prometheus.api('targets')['activeTargets']})",
    )
    return prometheus


def chat(router: RouterServer, *, stream: bool, **options: Any) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **options}
    url = f"{router.openai_base_url}/chat/completions"
    if stream:
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
            text = response.read().decode()
        assert response.status_code == 200, text
        assert text.rstrip().endswith("data: [DONE]"), text
    else:
        response = httpx.post(url, json=body, timeout=60)
        assert response.status_code == 200, response.text


def test_every_dashboard_and_alert_query_evaluates_on_the_real_router_metrics(scraping: ScrapingPrometheus) -> None:
    router = scraping.router
    # A counter's first sample gives rate() nothing to compare with, so one round creates the
    # series, Prometheus scrapes them, and a second round makes the rates (and quantiles) move.
    chat(router, stream=False, temperature=0)
    chat(router, stream=True)
    wait_until(
        lambda: (
            bool(scraping.query(f'modelfleet_time_to_first_token_seconds_count{{model="{MODEL}"}}'))
            and bool(scraping.query(f'modelfleet_completion_tokens_total{{model="{MODEL}"}}'))
        ),
        timeout=30,
    )
    chat(router, stream=False, temperature=0)  # a cache hit, for the cached-latency panel
    chat(router, stream=False)  # not cacheable: the backend generates again
    chat(router, stream=True)

    # The $model variable, as Grafana's label_values(modelfleet_requests_total, model) asks for it.
    models = scraping.api("label/model/values", **{"match[]": "modelfleet_requests_total"})
    assert MODEL in models

    panels = {panel["title"]: panel for panel in dashboard()["panels"]}

    def shows_a_number(expr: str) -> bool:
        if scraping.has_number(expr):
            return True
        # Keep traffic flowing while waiting, so a rate over the last minute always has an increase.
        chat(router, stream=True)
        return False

    for title in KEY_PANELS:
        first = grafana_expr(panels[title]["targets"][0]["expr"])
        wait_until(lambda first=first: shows_a_number(first), timeout=30, interval=2,
                   on_timeout=lambda t=title, e=first: f"({t}: {scraping.query(e)}; buckets: "
                   f"{scraping.query('modelfleet_request_duration_seconds_count')})")  # fmt: skip

    for panel in panels.values():
        for target in panel["targets"]:
            scraping.query(grafana_expr(target["expr"]))  # asserts the query parses and evaluates
    assert scraping.has_number(f'sum by (model) (modelfleet_queue_depth{{model="{MODEL}"}})')

    for rule in alert_rules():
        scraping.query(rule["expr"])
    # Prometheus loaded the same file and evaluates it without error; a healthy router raises nothing
    # (RouterDown's absent() may be pending from the evaluation before the first scrape).
    assert sorted(rule["name"] for rule in scraping.loaded_rules()) == sorted(rule["alert"] for rule in alert_rules())
    wait_until(lambda: all(rule["health"] == "ok" for rule in scraping.loaded_rules()), timeout=15)
    wait_until(lambda: not scraping.active_alerts(), timeout=15, on_timeout=lambda: f"({scraping.active_alerts()})")


def test_the_adapter_queries_return_the_routers_queue_depth(scraping: ScrapingPrometheus) -> None:
    rules = load_yaml(ADAPTER_RULES)
    [external] = rules["externalRules"]

    # Discovery: the adapter lists series with seriesQuery and names them.
    found = scraping.api("series", **{"match[]": external["seriesQuery"]})
    assert {adapter_metric_name(external, series["__name__"]) for series in found} == {ROUTER_QUEUE_METRIC}

    def external_value(label_matchers: str, group_by: str = "") -> list[dict[str, Any]]:
        return scraping.query(
            adapter_query(external["metricsQuery"], "modelfleet_queue_depth", label_matchers, group_by)
        )

    expected = scraping.router_gauge("modelfleet_queue_depth")
    # The operator's HPA selector {model, namespace} (the adapter sorts it by key), then the
    # namespace the adapter adds itself; it leaves GroupBy empty for external rules.
    for matchers, group_by in (
        (f'model="{MODEL}",namespace="{NAMESPACE}",namespace="{NAMESPACE}"', ""),
        (f'model="{MODEL}"', "model"),
    ):
        [sample] = external_value(matchers, group_by)
        assert sample["metric"]["model"] == MODEL
        assert float(sample["value"][1]) == expected
    # Another namespace's HPA gets nothing, even when its selector names this model.
    assert external_value(f'model="{MODEL}",namespace="elsewhere",namespace="elsewhere"') == []

    # The vLLM Pods rule: what the adapter asks for the pods of one HPA's target. No vLLM runs
    # here, so this proves the query is valid, not that it finds data.
    [engine] = rules["rules"]
    query = adapter_query(
        engine["metricsQuery"], "vllm:num_requests_waiting", f'namespace="{NAMESPACE}",pod=~"llama-0|llama-1"', "pod"
    )
    assert scraping.query(query) == []
