"""The router's Prometheus metrics: modelfleet_ prefix, base units, bounded labels only."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class RouterMetrics:
    registry: CollectorRegistry
    requests: Counter
    duration: Histogram
    queue_depth: Gauge
    in_flight: Gauge
    queue_wait: Histogram
    rejected: Counter
    upstream_errors: Counter
    cache_lookups: Counter

    @classmethod
    def create(cls) -> RouterMetrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter("modelfleet_requests_total", "Requests answered", ["model", "route", "status_class"],
                             registry=registry),
            duration=Histogram("modelfleet_request_duration_seconds", "Time to the last byte of a response",
                               ["model", "route"], buckets=LATENCY_BUCKETS, registry=registry),
            queue_depth=Gauge("modelfleet_queue_depth", "Requests waiting for a slot", ["model"], registry=registry),
            in_flight=Gauge("modelfleet_in_flight_requests", "Requests holding a slot", ["model"], registry=registry),
            queue_wait=Histogram("modelfleet_queue_wait_seconds", "Time spent waiting for a slot", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=registry),
            rejected=Counter("modelfleet_rejected_requests_total", "Requests refused by admission",
                             ["model", "reason"], registry=registry),
            upstream_errors=Counter("modelfleet_upstream_errors_total", "Backend failures", ["model", "code"],
                                    registry=registry),
            cache_lookups=Counter("modelfleet_cache_lookups_total", "Response cache lookups by result",
                                  ["model", "result"], registry=registry),
        )  # fmt: skip
