"""The real Redis and Prometheus fixtures run, answer, and are ours."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import redis

from tests.conftest import PrometheusServer, RedisServer
from tests.support.procs import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.harness]


def test_redis_fixture_serves_commands_from_its_own_directory(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    try:
        assert client.ping()
        client.set("modelfleet:probe", "value", ex=30)
        assert client.get("modelfleet:probe") == b"value"
        assert client.incrby("modelfleet:counter", 5) == 5
        # The server we talk to is the one the fixture started, not a system Redis.
        assert client.config_get("dir")["dir"] == str(redis_server.data_dir)
        assert int(client.info("server")["tcp_port"]) == redis_server.port
    finally:
        client.close()


def test_redis_fixture_stops_its_server(redis_server: RedisServer) -> None:
    redis_server.process.stop()
    assert redis_server.process.process.poll() is not None
    client = redis.Redis.from_url(redis_server.url, socket_timeout=1)
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()


def query(prometheus: PrometheusServer, promql: str) -> list[dict[str, object]]:
    url = f"{prometheus.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def test_prometheus_fixture_scrapes_and_answers_promql(prometheus_server: PrometheusServer) -> None:
    def scraped_itself() -> bool:
        samples = query(prometheus_server, 'up{job="prometheus"}')
        return bool(samples) and samples[0]["value"][1] == "1"  # type: ignore[index]

    wait_until(scraped_itself, timeout=30, interval=0.5)
    # A rate needs two scrapes; at a 1 s interval the second one follows within seconds.
    wait_until(
        lambda: bool(query(prometheus_server, "sum(rate(prometheus_http_requests_total[1m]))")),
        timeout=30,
        interval=0.5,
    )


def test_promtool_accepts_good_rules_and_rejects_bad_ones(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with the Debian prometheus package (make install)"
    good = tmp_path / "good.yml"
    good.write_text("groups:\n- name: probe\n  rules:\n  - alert: Probe\n    expr: up == 0\n    for: 1m\n")
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n- name: probe\n  rules:\n  - alert: Probe\n    expr: up ==\n")
    ok = subprocess.run([promtool, "check", "rules", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = subprocess.run([promtool, "check", "rules", str(bad)], capture_output=True, text=True)
    assert refused.returncode != 0
    assert "parse error" in (refused.stdout + refused.stderr)
