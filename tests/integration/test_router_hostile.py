"""Hostile input against the router: every case gets a 4xx in OpenAI's error shape, never a 5xx, and
nothing secret reaches the router's log."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import OllamaServer, RouterServer, hashed_key, running_router, settled_chat_calls, write_keys_file

pytestmark = pytest.mark.integration

CHAT = {"model": "gemma3:270m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error: dict[str, object] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


@pytest.mark.parametrize(
    ("name", "body", "status"),
    [
        ("deeply nested JSON", b'{"model": "gemma3:270m", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400),
        ("invalid UTF-8", b'{"model": "gemma3:270m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
        ("a JSON array", b"[1, 2, 3]", 400),
        ("a bare string", b'"hello"', 400),
        ("empty body", b"", 400),
        ("NaN in a number", b'{"model": "gemma3:270m", "messages": [], "temperature": NaN}', 400),
    ],
)
def test_malformed_bodies_are_400(router_server: RouterServer, name: str, body: bytes, status: int) -> None:
    response = httpx.post(f"{router_server.openai_base_url}/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert_openai_error(response, status)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 1000}, "n"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 10**12}, "max_tokens"),
        ({"temperature": 99}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "hacker", "content": "x"}]}, "messages.0.role"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": ""}, "model"),
    ],
)
def test_out_of_range_fields_are_400_and_name_the_field(
    router_server: RouterServer, change: dict[str, object], param: str
) -> None:
    response = httpx.post(f"{router_server.openai_base_url}/chat/completions", json={**CHAT, **change}, timeout=30)
    error = assert_openai_error(response, 400)
    assert str(error["param"]).startswith(param)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", b'{"model": "gemma3:270m", "messages": [{"role": "user", "content": "a\\ud800b"}]}'),
        ("/chat/completions", b'{"model": "gemma3:270m", "messages": [{"role": "user", "content": "hi"}], '
                              b'"seed": 123456789012345678901234567890}'),
        ("/chat/completions", b'{"model": "gemma3:270m", "messages": [{"role": "user", "content": "hi", "x": '
                              + b"[" * 300 + b"]" * 300 + b"}]}"),
        ("/completions", b'{"model": "gemma3:270m", "prompt": "hi", "user": "\\udfff"}'),
        ("/responses", b'{"model": "gemma3:270m", "input": []}'),
    ],
)  # fmt: skip
def test_bodies_the_router_cannot_forward_are_400(router_server: RouterServer, path: str, body: bytes) -> None:
    """Found by schemathesis: lone surrogates, integers beyond 64 bits and nesting past orjson's limit were 500s
    when the router re-encoded the body; an empty Responses input was a 500 in its translation."""
    response = httpx.post(f"{router_server.openai_base_url}{path}", content=body,
                          headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert_openai_error(response, 400)


def test_header_injection_through_a_model_name_goes_nowhere(router_server: RouterServer) -> None:
    response = httpx.post(f"{router_server.openai_base_url}/chat/completions",
                          json={**CHAT, "model": "x\r\nSet-Cookie: pwned=1"}, timeout=30)  # fmt: skip
    assert_openai_error(response, 404)
    assert "set-cookie" not in response.headers
    assert all("pwned" not in value for value in response.headers.values())


def test_an_oversized_body_is_413_even_without_content_length(router_server: RouterServer) -> None:
    def chunks() -> object:
        yield b'{"model": "gemma3:270m", "messages": [{"role": "user", "content": "'
        for _ in range(2048):
            yield b"x" * 1024
        yield b'"}]}'

    response = httpx.post(f"{router_server.openai_base_url}/chat/completions", content=chunks(),  # type: ignore[arg-type]
                          headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert_openai_error(response, 413)


def test_prompts_answers_and_keys_stay_out_of_the_log(ollama_server: OllamaServer, tmp_path: Path) -> None:
    """A full run of requests (plain, streamed, refused) leaves no prompt, answer or key in the router's log."""
    key, wrong_key = "mf-secret-key-7f3a91", "mf-wrong-key-22c0d5"
    keys_file = write_keys_file(tmp_path, hashed_key("team", key))
    models: list[dict[str, object]] = [{"name": ollama_server.model, "url": ollama_server.base_url}]
    prompt = "The secret launch code is zebra-4471-quartz."
    with running_router(tmp_path, models, auth_required="true", api_keys_file=str(keys_file)) as router:
        url = f"{router.openai_base_url}/chat/completions"
        body = {**CHAT, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12}
        answer = httpx.post(url, json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)
        assert answer.status_code == 200
        text = answer.json()["choices"][0]["message"]["content"]
        streamed = httpx.post(url, json={**body, "stream": True}, headers={"x-api-key": key}, timeout=60)
        assert streamed.status_code == 200
        assert (
            httpx.post(url, json=body, headers={"authorization": f"Bearer {wrong_key}"}, timeout=10).status_code == 401
        )
        assert (
            httpx.post(url, json={**body, "max_tokens": -1}, headers={"x-api-key": key}, timeout=10).status_code == 400
        )
    log = router.process.log_path.read_text(errors="replace")
    assert "Application startup complete" in log, "the log is the router's"
    assert text.strip()
    for secret in (prompt, "zebra-4471-quartz", key, wrong_key, text.strip()[:40]):
        assert secret not in log, f"{secret!r} appears in the router's log"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/chat/completions", {"messages": [{"role": "user", "content": "x" * 150_000},
                                            {"role": "user", "content": [{"type": "text", "text": "y" * 60_000}]}]},
         "messages"),
        ("/completions", {"prompt": "z" * 200_001}, "prompt"),
        ("/responses", {"input": "w" * 200_001}, "messages"),
    ],
)  # fmt: skip
def test_a_prompt_over_the_limit_is_400_before_any_backend_call(
    router_server: RouterServer, ollama_server: OllamaServer, path: str, body: dict[str, object], param: str
) -> None:
    calls = settled_chat_calls(ollama_server)
    response = httpx.post(f"{router_server.openai_base_url}{path}", json={"model": "gemma", **body}, timeout=30)
    error = assert_openai_error(response, 400)
    assert error["code"] == "prompt_too_long"
    assert error["param"] == param
    assert "200000" in str(error["message"])
    assert settled_chat_calls(ollama_server) == calls
