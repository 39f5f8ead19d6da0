"""The Anthropic Messages API's pure parts: its error shape by path, and the usage a stream is charged."""

from __future__ import annotations

import orjson
import pytest

from modelfleet.server.errors import (
    RouterError,
    anthropic_error_type,
    anthropic_path,
    error_response,
    path_error_body,
)
from modelfleet.server.streaming import MessagesAssembler, messages_text

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("path", "anthropic"),
    [
        ("/v1/messages", True),
        ("/v1/messages/count_tokens", True),
        ("/v1/messagesx", False),
        ("/v1/chat/completions", False),
        ("/messages", False),
        ("", False),
    ],
)
def test_only_the_messages_paths_speak_anthropic(path: str, anthropic: bool) -> None:
    assert anthropic_path(path) is anthropic


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (422, "invalid_request_error"),  # any other 4xx
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),  # any other 5xx
        (503, "overloaded_error"),
        (504, "timeout_error"),
    ],
)
def test_each_status_gets_anthropics_documented_error_type(status: int, kind: str) -> None:
    assert anthropic_error_type(status) == kind


def test_one_error_has_each_apis_shape_on_its_own_paths() -> None:
    error = RouterError(429, "The key's token budget is spent.", type="rate_limit_exceeded", code="tokens",
                        headers={"retry-after": "7"})  # fmt: skip
    anthropic = error_response(error, "/v1/messages")
    assert anthropic.status_code == 429
    assert anthropic.headers["retry-after"] == "7"
    assert orjson.loads(anthropic.body) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "The key's token budget is spent. (tokens)"},
    }
    openai = orjson.loads(error_response(error, "/v1/chat/completions").body)
    assert openai["error"]["type"] == "rate_limit_exceeded"
    assert openai["error"]["code"] == "tokens"
    # The layers below FastAPI's handlers (body size, the hot path) build the same shapes.
    assert path_error_body("/v1/messages", 413, "Too large.", "invalid_request_error", "body_too_large") == {
        "type": "error",
        "error": {"type": "request_too_large", "message": "Too large. (body_too_large)"},
    }
    assert path_error_body("/v1/completions", 413, "Too large.", "invalid_request_error")["error"]["message"] == (
        "Too large."
    )


def test_a_streams_usage_is_its_latest_count_of_each_kind() -> None:
    usage = MessagesAssembler()
    # Ollama's message_start estimates the input before evaluating the prompt; message_delta has the real one.
    usage.add({"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 0}}})
    usage.add({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}})
    usage.add({"type": "ping"})
    assert usage.usage == {"input_tokens": 9, "output_tokens": 0}
    usage.add(
        {"type": "message_delta", "usage": {"input_tokens": 12, "output_tokens": 5, "cache_read_input_tokens": None}}
    )
    assert usage.usage == {"input_tokens": 12, "output_tokens": 5}
    usage.add({"type": "message_delta", "usage": "not a mapping"})
    assert usage.usage == {"input_tokens": 12, "output_tokens": 5}
    assert usage.result() is None  # streamed messages are never rebuilt for the cache


def test_only_content_deltas_carry_generated_tokens() -> None:
    assert messages_text({"type": "content_block_delta", "delta": {"type": "input_json_delta", "partial_json": "{"}})
    assert not messages_text({"type": "message_delta", "usage": {"output_tokens": 3}})
    assert not messages_text({"type": "ping"})
