"""The router's OpenAPI documents what the routes really return, and bodies the router could not forward are 400s.

Found by the schemathesis run (tests/integration/test_router_schemathesis.py): lone surrogates, integers beyond
64 bits and deep nesting passed validation and crashed the router when it re-encoded the body (500); an empty
Responses `input` crashed the translation to a chat request (500).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from modelfleet.server.admission import Generation
from modelfleet.server.api.responses import response_events
from modelfleet.server.app import create_app
from modelfleet.server.errors import RouterError
from modelfleet.server.relay import StreamEvent, StreamFailure, StreamPlan
from modelfleet.server.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest, ResponsesRequest
from modelfleet.server.settings import RouterSettings

pytestmark = pytest.mark.unit

GENERATION_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/generate",
                     "/v1/generate/stream", "/infer"]  # fmt: skip
ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    return create_app(RouterSettings(auth_required=False)).openapi()


@pytest.mark.parametrize("path", GENERATION_ROUTES)
def test_generation_routes_document_the_errors_they_return(openapi: dict[str, Any], path: str) -> None:
    responses = openapi["paths"][path]["post"]["responses"]
    assert "422" not in responses  # the router answers validation errors with 400
    for status in ("400", "401", "403", "404", "413", "429", "502", "503", "504", "4XX"):
        assert responses[status]["content"] == {"application/json": {"schema": ERROR_REF}}, status
    assert "retry-after" in responses["429"]["headers"]


def test_the_error_body_is_openais(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    detail = schemas["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}
    assert detail["additionalProperties"] is False


def test_answers_are_documented_as_json_or_server_sent_events(openapi: dict[str, Any]) -> None:
    def content(path: str, method: str = "post") -> set[str]:
        return set(openapi["paths"][path][method]["responses"]["200"]["content"])

    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        assert content(path) == {"application/json", "text/event-stream"}
    assert content("/v1/generate/stream") == {"text/event-stream"}
    assert content("/v1/generate") == content("/infer") == content("/v1/models", "get") == {"application/json"}
    assert openapi["paths"]["/v1/admin/models"]["get"]["responses"].keys() == {"200", "401", "403"}


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": "a\ud800b"}]}),
        (ChatCompletionRequest, {**CHAT, "stop": "\udfff"}),
        (ChatCompletionRequest, {**CHAT, "seed": 2**70}),
        (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": "hi", "name": -(2**64)}]}),
        (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "n": 2**64}]}]}),
        (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": "hi", "x": orjson.loads(
            "[" * 300 + "]" * 300)}]}),
        (ChatCompletionRequest, {**CHAT, "logit_bias": {"1": 2**80}}),  # ignored fields too: they are not JSON
        (CompletionRequest, {"model": "m", "prompt": "x", "user": "\ud800"}),
        (ResponsesRequest, {"model": "m", "input": "\ud800"}),
        (GenerateRequest, {"prompt": "x", "system": "\udc00"}),
    ],
)  # fmt: skip
def test_a_body_the_router_could_not_reencode_is_refused(model: type[Any], body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as refused:
        model.model_validate(body)
    assert refused.value.errors()[0]["type"] == "json_not_forwardable"


def test_seeds_are_int64_and_the_rest_is_still_accepted() -> None:
    assert ChatCompletionRequest.model_validate({**CHAT, "seed": 2**63 - 1}).seed == 2**63 - 1
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**CHAT, "seed": 2**63})
    message = {"role": "user", "content": "é ✓ 🦙", "x": orjson.loads("[" * 200 + "]" * 200)}
    assert ChatCompletionRequest.model_validate({**CHAT, "messages": [message]}).messages[0].content == "é ✓ 🦙"


def test_a_responses_request_needs_some_input() -> None:
    with pytest.raises(ValidationError) as refused:
        ResponsesRequest.model_validate({"model": "m", "input": []})
    assert refused.value.errors()[0]["loc"] == ("input",)
    assert ResponsesRequest.model_validate({"model": "m", "input": ""}).input == ""


def test_a_responses_stream_that_fails_sends_openais_error_event() -> None:
    async def events() -> AsyncIterator[StreamEvent]:
        yield {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
        yield StreamFailure(RouterError(502, "The backend failed mid-stream.", type="upstream_error",
                                        code="upstream_stream_broken"))  # fmt: skip

    generation = cast(Generation, SimpleNamespace(name="m", answer_name="m", queue_seconds=0.0, backend_seconds=0.0,
                                                  started=time.monotonic()))  # fmt: skip
    request = ResponsesRequest.model_validate({"model": "m", "input": "hi", "stream": True})

    async def collect() -> list[bytes]:
        return [chunk async for chunk in response_events(StreamPlan(events(), cached=False), generation, request)]

    frames = [frame.decode().split("\n") for frame in asyncio.run(collect())]
    names = [lines[0].removeprefix("event: ") for lines in frames]
    assert names[-2:] == ["error", "response.failed"]
    error = orjson.loads(frames[-2][1].removeprefix("data: "))
    assert error == {"type": "error", "sequence_number": len(frames) - 1, "code": "upstream_stream_broken",
                     "message": "The backend failed mid-stream.", "param": None}  # fmt: skip
    for lines in frames:
        assert orjson.loads(lines[1].removeprefix("data: "))["type"] == lines[0].removeprefix("event: ")


def test_a_body_the_framework_cannot_parse_is_a_400_with_a_code() -> None:
    """Python's JSON parser refuses integers of more than 4300 digits: the framework's 400 gets our code too."""
    with TestClient(create_app(RouterSettings(auth_required=False))) as client:
        response = client.post("/v1/chat/completions", content=b'{"model": "m", "seed": 1' + b"0" * 5000 + b"}",
                               headers={"content-type": "application/json"})  # fmt: skip
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_request"
        assert client.delete("/v1/chat/completions").json()["error"]["code"] == "method_not_allowed"
