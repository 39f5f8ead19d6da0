"""The router's OpenTelemetry switch: FastAPI's spans when it is on, and none (nor any per-request
provider check) when it is off, its default."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelfleet.server.app import create_app
from modelfleet.server.settings import RouterSettings

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """The global tracer provider, as opentelemetry-instrument would set it (it can be set once a process)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.mark.parametrize("enabled", [False, True])
def test_requests_are_traced_only_when_opentelemetry_is_on(spans: InMemorySpanExporter, enabled: bool) -> None:
    spans.clear()
    app = create_app(RouterSettings(auth_required=False, opentelemetry=enabled))
    with TestClient(app) as client:
        assert client.get("/livez").status_code == 200
    routes = [span.attributes.get("http.route") for span in spans.get_finished_spans() if span.attributes]
    assert ("/livez" in routes) is enabled, routes
