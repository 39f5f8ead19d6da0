"""Reading a spec written against a newer CRD (modelfleet.api.reading): what this version does not know is
left out and named; what is malformed is still refused."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from modelfleet.api.reading import read_spec
from modelfleet.server.cluster_models import models_from_cluster

pytestmark = pytest.mark.unit

ENDPOINT = {"model": "llama", "endpoint": {"url": "http://llm.ai.svc"}}


def test_a_spec_this_version_knows_is_read_whole_with_its_defaults() -> None:
    spec, ignored = read_spec({**ENDPOINT, "serving": {"maxQueue": 5}})
    assert ignored == []
    assert spec.serving is not None
    assert (spec.serving.max_queue, spec.serving.max_in_flight_per_replica, spec.serving.routing) == (5, 4, "prefix")


def test_fields_and_values_of_a_newer_version_are_left_out_and_named() -> None:
    newer = {
        **ENDPOINT,
        "priorityClass": "gold",
        "serving": {"maxQueue": 5, "routing": "kvAware", "shadow": {"percent": 10}},
        "endpoint": {"url": "http://llm.ai.svc", "api": "anthropic"},
    }
    spec, ignored = read_spec(newer)
    assert sorted(ignored) == ["endpoint.api", "priorityClass", "serving.routing", "serving.shadow"]
    assert spec.serving is not None
    assert (spec.serving.max_queue, spec.serving.routing) == (5, "prefix")
    assert spec.endpoint is not None
    assert spec.endpoint.api == "openai"
    assert newer["serving"] == {"maxQueue": 5, "routing": "kvAware", "shadow": {"percent": 10}}, (
        "the input is not changed"
    )


@pytest.mark.parametrize(
    "malformed",
    [
        {"endpoint": {"url": "http://llm.ai.svc"}},  # no model
        {**ENDPOINT, "serving": {"maxQueue": "lots"}},  # a value of the wrong type
        {**ENDPOINT, "serving": {"maxQueue": -1}},  # out of range
    ],
)
def test_a_malformed_spec_is_still_refused(malformed: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        read_spec(malformed)


def test_the_router_serves_a_newer_versions_model_and_says_what_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    body = {
        "metadata": {"name": "llama", "namespace": "ai", "generation": 3},
        "spec": {**ENDPOINT, "serving": {"maxQueue": 7, "routing": "kvAware"}},
    }
    with caplog.at_level(logging.WARNING, logger="modelfleet.server.cluster_models"):
        (spec,) = models_from_cluster([body], [])
    assert (spec.name, spec.max_queue, spec.routing) == ("llama", 7, "prefix")
    assert "this router does not know spec.serving.routing" in caplog.text
