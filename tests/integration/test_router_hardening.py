"""What an attacker or a broken backend could get from the router, and no longer does: a 500 for a backend's
200 that is not JSON, the replicas' addresses from /health, a redirect to the client's own Host, a body
validated before the caller is known, and strings taken for booleans and numbers. The router runs as a
process; the backend is a recording one (tests/support/recording_backend.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import RouterServer, hashed_key, running_router, write_keys_file
from tests.support.recording_backend import RecordingBackend, recording_backend

pytestmark = pytest.mark.integration

USER, ADMIN = "sk-user", "sk-admin"
CHOICE = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
ANSWER = {"id": "c", "object": "chat.completion", "created": 1, "model": "scripted", "choices": [CHOICE]}


def scripted(body: dict[str, Any]) -> bytes | dict[str, Any]:
    """A broken backend for some prompts: plain text, or a JSON list, with a 200."""
    prompt = body["messages"][-1]["content"]
    return {"text": b"upstream proxy says hello", "list": b"[1, 2, 3]"}.get(prompt, ANSWER)


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RouterServer, RecordingBackend]]:
    work = tmp_path_factory.mktemp("router")
    keys = write_keys_file(work, hashed_key("user", USER), hashed_key("admin", ADMIN, admin=True))
    with recording_backend(scripted) as backend:
        models: list[dict[str, object]] = [{"name": "m", "url": backend.base_url, "upstream_model": "scripted"}]
        with running_router(work, models, api_keys_file=str(keys), auth_required="true") as running:
            yield running, backend


def chat(router: RouterServer, body: dict[str, Any], key: str | None = USER, path: str = "/v1/chat/completions",
         **headers: str) -> httpx.Response:  # fmt: skip
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{router.base_url}{path}", json=body, headers=headers, timeout=30, follow_redirects=False)


@pytest.mark.parametrize("prompt", ["text", "list"])
def test_a_backends_200_that_is_not_a_json_object_is_a_502(
    router: tuple[RouterServer, RecordingBackend], prompt: str
) -> None:
    response = chat(router[0], {"model": "m", "messages": [{"role": "user", "content": prompt}]})
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "upstream_error"


def test_health_shows_no_address_without_the_admin_key(router: tuple[RouterServer, RecordingBackend]) -> None:
    server, backend = router
    public = httpx.get(f"{server.base_url}/health", timeout=10)
    user = httpx.get(f"{server.base_url}/health", headers={"Authorization": f"Bearer {USER}"}, timeout=10)
    for response in (public, user):
        assert set(response.json()) == {"status", "model", "ollama_reachable", "cache_stats"}, response.text
        assert backend.base_url.split("//")[1] not in response.text
    admin = httpx.get(f"{server.base_url}/health", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).json()
    assert {"backends", "models", "redis", "discovery"} <= set(admin)


def test_no_redirect_is_built_from_the_host_header(router: tuple[RouterServer, RecordingBackend]) -> None:
    response = chat(router[0], {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                    path="/v1/chat/completions/", Host="evil.example")  # fmt: skip
    assert response.status_code == 404, response.headers
    assert "evil.example" not in response.headers.get("location", "")


def test_the_caller_is_known_before_its_body_is_read(router: tuple[RouterServer, RecordingBackend]) -> None:
    malformed = {"model": "m", "messages": "not a list"}
    assert chat(router[0], malformed, key=None).status_code == 401
    assert chat(router[0], malformed, key="sk-unknown").status_code == 401
    assert chat(router[0], malformed).status_code == 400


@pytest.mark.parametrize(("field", "value"), [("stream", "yes"), ("max_tokens", "10"), ("logprobs", "on"),
                                              ("max_tokens", 10.5), ("n", True)])  # fmt: skip
def test_strings_are_not_taken_for_booleans_or_numbers(
    router: tuple[RouterServer, RecordingBackend], field: str, value: object
) -> None:
    response = chat(router[0], {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value})
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == ("invalid_request", field)


def test_well_typed_fields_still_pass(router: tuple[RouterServer, RecordingBackend]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "logprobs": False,
            "temperature": 1, "top_p": 1, "n": 1, "stream": False}  # fmt: skip
    response = chat(router[0], body)
    assert response.status_code == 200, response.text
