"""The generation routes are served by the hot path (hotpath.py), with FastAPI's error format and refusals."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from modelfleet.server import admission
from modelfleet.server.api import admin, compat, health, openai, responses
from modelfleet.server.app import create_app
from modelfleet.server.hotpath import hot_routes, json_content
from modelfleet.server.schemas import ResponsesRequest
from modelfleet.server.settings import RouterSettings

pytestmark = pytest.mark.unit

GENERATION_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/generate",
                     "/v1/generate/stream", "/infer"}  # fmt: skip
CHAT = b'{"model": "nowhere", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(RouterSettings(auth_required=False))) as client:
        yield client


def test_every_generation_route_and_nothing_else_takes_the_hot_path() -> None:
    table = hot_routes(api.router for api in (openai, responses, compat, admin, health))
    assert set(table) == GENERATION_ROUTES


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
def test_a_body_not_sent_as_json_is_refused(client: TestClient, content_type: str | None) -> None:
    """A browser may post a form or text/plain cross-site without a preflight: such bodies are never run."""
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/chat/completions", content=CHAT, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "The request body must be JSON, sent with content-type: application/json."
    )


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.api+json"])  # fmt: skip
def test_json_bodies_reach_the_endpoint(client: TestClient, content_type: str) -> None:
    response = client.post("/v1/chat/completions", content=CHAT, headers={"content-type": content_type})
    assert response.status_code == 404  # the endpoint ran: the model does not exist
    assert response.json()["error"]["type"] == "not_found_error"


def test_invalid_json_says_where(client: TestClient) -> None:
    response = client.post("/v1/completions", content=b'{"model": "m", "prompt": ',
                           headers={"content-type": "application/json"})  # fmt: skip
    error = response.json()["error"]
    assert response.status_code == 400
    assert error["message"].startswith("The request body is not valid JSON (EOF while parsing")
    assert error["code"] == "invalid_request"


def test_a_bad_field_is_named(client: TestClient) -> None:
    response = client.post("/v1/generate", json={"prompt": "hi", "max_tokens": -1})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"


def test_other_routes_and_methods_go_on_to_fastapi(client: TestClient) -> None:
    assert client.get("/v1/chat/completions").json()["error"]["code"] == "method_not_allowed"
    assert client.get("/v1/models").status_code == 200
    assert client.post("/v1/chat/completions/x", content=CHAT).status_code == 404


def test_json_content_reads_only_the_content_type() -> None:
    assert json_content({"headers": [(b"accept", b"application/json"), (b"content-type", b"application/json")]})
    assert not json_content({"headers": [(b"accept", b"application/json")]})
    assert not json_content({"headers": [(b"content-type", b"text/json+plain")]})


@pytest.mark.parametrize("failure", ["runtime", "validation"])
def test_a_failure_inside_the_endpoint_is_a_500_in_the_one_format(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """Only the request body's validation is the client's fault; a model the router builds itself failing is ours."""

    async def broken(*_args: object, **_kwargs: object) -> None:
        if failure == "validation":
            ResponsesRequest.model_validate({})
        raise RuntimeError("a bug")

    monkeypatch.setattr(admission, "prepare", broken)
    response = client.post("/v1/chat/completions", content=CHAT, headers={"content-type": "application/json"})
    assert response.status_code == 500
    assert response.json()["error"] == {"message": "The router failed to handle the request.",
                                         "type": "server_error", "param": None, "code": None}  # fmt: skip


def test_a_generation_request_looks_its_key_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hot path names the caller before reading the body; admission takes that caller, not a second lookup."""
    from modelfleet.server.auth import KeyRing

    lookups: list[str] = []
    real = KeyRing.authenticate

    def counted(self: KeyRing, request: object) -> object:
        lookups.append(getattr(request, "url", None).path)  # type: ignore[union-attr]
        return real(self, request)  # type: ignore[arg-type]

    monkeypatch.setattr(KeyRing, "authenticate", counted)
    with TestClient(create_app(RouterSettings(auth_required=False))) as client:
        response = client.post("/v1/chat/completions", content=CHAT, headers={"content-type": "application/json"})
    assert response.status_code == 404  # admission ran: the model does not exist
    assert lookups == ["/v1/chat/completions"]
