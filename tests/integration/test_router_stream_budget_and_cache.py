"""A stream's token budget cannot be dodged by leaving early, and the cache never serves a lossy or another
key's answer: the router with the real `openai` SDK and httpx as clients, in front of a recording backend
(tests/support/recording_backend.py) that streams what a test needs (tool calls, a pause before the end),
which no engine here does on demand."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RouterServer, hashed_key, running_router, write_keys_file
from tests.support.recording_backend import RecordingBackend, recording_backend

pytestmark = pytest.mark.integration

TOKENS = 90  # what the scripted engine generates for a request
LEFT_AFTER = 85  # the text chunks a leaving client reads: just before the end
BUDGET = 400  # tokens per minute per key
CREATED = 1_765_000_000
TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}


def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": CREATED, "model": "scripted",
            "system_fingerprint": "fp_scripted", "choices": [choice], **extra}  # fmt: skip


class Engine:
    """Answers like an engine: one token a chunk; a tool call when tools are asked for; and, when `pause` is
    set, holds the last few tokens back until `resume` (so a client can leave just before the end)."""

    def __init__(self) -> None:
        self.pause = False
        self.resume = threading.Event()

    def text(self, body: dict[str, Any]) -> str:
        return "".join(f"w{i} " for i in range(int(body.get("max_tokens") or TOKENS)))

    def __call__(self, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        if not body.get("stream"):
            tokens = int(body.get("max_tokens") or TOKENS)
            message: dict[str, Any] = {"role": "assistant", "content": self.text(body)}
            reason = "stop"
            if body.get("tools"):
                message, reason = {"role": "assistant", "content": None, "tool_calls": [CALL]}, "tool_calls"
            return {"id": "chatcmpl-2", "object": "chat.completion", "created": CREATED + 5, "model": "scripted",
                    "system_fingerprint": "fp_scripted", "choices": [{"index": 0, "message": message,
                    "finish_reason": reason}], "usage": {"prompt_tokens": 3, "completion_tokens": tokens,
                    "total_tokens": tokens + 3}}  # fmt: skip
        return self.stream(body)

    def stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if body.get("tools"):
            yield chunk({"role": "assistant", "tool_calls": [{"index": 0, **CALL}]})
            yield chunk({}, "tool_calls")
            return
        tokens = int(body.get("max_tokens") or TOKENS)
        for i in range(tokens):
            if self.pause and i == LEFT_AFTER:
                self.resume.wait(timeout=60)
            yield chunk({"role": "assistant", "content": f"w{i} "} if i == 0 else {"content": f"w{i} "})
        yield chunk({}, "stop")
        yield {**chunk({}), "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": tokens,
                                                     "total_tokens": tokens + 3}}  # fmt: skip


@pytest.fixture
def engine() -> Iterator[tuple[Engine, RecordingBackend]]:
    scripted = Engine()
    with recording_backend(scripted) as backend:
        try:
            yield scripted, backend
        finally:
            scripted.resume.set()


def models(backend: RecordingBackend, **options: object) -> list[dict[str, object]]:
    return [{"name": "m", "url": backend.base_url, "upstream_model": "scripted", **options}]


def leave_before_the_end(router: RouterServer, key: str, turn: int) -> int:
    """A stream read until LEFT_AFTER text chunks, then the connection closed; returns the HTTP status."""
    body = {"model": "m", "messages": [{"role": "user", "content": f"Count {turn}."}], "max_tokens": TOKENS,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{router.base_url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=60) as response:  # fmt: skip
        if response.status_code != 200:
            response.read()
            assert response.json()["error"]["code"] == "rate_limit_tokens", response.text
            return response.status_code
        read = 0
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                read += bool(json.loads(line[6:])["choices"][0]["delta"].get("content"))
            if read == LEFT_AFTER:
                break
        assert read == LEFT_AFTER
    return 200


def test_leaving_a_stream_just_before_its_end_is_charged_so_the_budget_holds(
    engine: tuple[Engine, RecordingBackend], tmp_path: Path
) -> None:
    scripted, backend = engine
    scripted.pause = True
    keys = write_keys_file(tmp_path, hashed_key("team", "sk-team", tokens_per_minute=BUDGET))
    with running_router(tmp_path, models(backend), api_keys_file=str(keys), auth_required="true") as router:
        statuses = [leave_before_the_end(router, "sk-team", turn) for turn in range(8)]
    admitted = statuses.count(200)
    # Each stream reserves its prompt (about 3 tokens) plus max_tokens 90 at admission, and a client that
    # leaves is charged its prompt and the 85 tokens it was sent: 4 fit in 400 tokens, then 429. Refunded
    # in full, as before, all 8 would pass.
    assert statuses[0] == 200, statuses
    assert admitted <= BUDGET // (LEFT_AFTER + 3) + 1, statuses
    assert 429 in statuses, statuses


def test_a_streamed_tool_call_is_not_cached_as_a_lossy_answer(engine: tuple[Engine, RecordingBackend],
                                                              tmp_path: Path) -> None:  # fmt: skip
    _, backend = engine
    with running_router(tmp_path, models(backend)) as router:
        sdk = openai.OpenAI(base_url=f"{router.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
        ask: Any = {"model": "m", "messages": [{"role": "user", "content": "Weather?"}], "tools": [TOOL],
                    "temperature": 0}  # fmt: skip
        streamed = list(sdk.chat.completions.create(**ask, stream=True))
        assert streamed[-1].choices[0].finish_reason == "tool_calls"
        calls_before = len(backend.bodies)
        whole = sdk.chat.completions.with_raw_response.create(**ask)
    assert len(backend.bodies) == calls_before + 1, "the non-streamed request was answered from the cache"
    assert whole.headers["x-modelfleet-cache"] != "hit"
    answer = whole.parse()
    assert [call.model_dump() for call in answer.choices[0].message.tool_calls or []] == [CALL]


def test_a_cached_stream_answers_as_the_backend_would_field_by_field(engine: tuple[Engine, RecordingBackend],
                                                                    tmp_path: Path) -> None:  # fmt: skip
    _, backend = engine
    ask = {"model": "m", "messages": [{"role": "user", "content": "Count."}], "max_tokens": 5, "temperature": 0}
    with running_router(tmp_path, models(backend)) as router:
        direct = httpx.post(f"{backend.base_url}/v1/chat/completions", json={**ask, "model": "scripted"}).json()
        with httpx.stream("POST", f"{router.base_url}/v1/chat/completions", json={**ask, "stream": True}) as stream:
            stream.read()
        hit = httpx.post(f"{router.base_url}/v1/chat/completions", json=ask, timeout=60)
    assert hit.headers["x-modelfleet-cache"] == "hit"
    expected = {**direct, "model": "m"}
    # Every field but the ids and timestamps, which name one generation.
    assert {k: v for k, v in hit.json().items() if k not in ("id", "created")} == {
        k: v for k, v in expected.items() if k not in ("id", "created")
    }


@pytest.mark.parametrize(("shared", "second_lookup"), [(False, "miss"), (True, "hit")])
def test_the_cache_is_per_key_unless_the_model_shares_it(
    engine: tuple[Engine, RecordingBackend], tmp_path: Path, shared: bool, second_lookup: str
) -> None:
    _, backend = engine
    keys = write_keys_file(tmp_path, hashed_key("a", "sk-a"), hashed_key("b", "sk-b"))
    ask = {"model": "m", "messages": [{"role": "user", "content": "Same question."}], "max_tokens": 4,
           "temperature": 0}  # fmt: skip
    with running_router(tmp_path, models(backend, cache_shared_across_keys=shared), api_keys_file=str(keys),
                        auth_required="true") as router:  # fmt: skip

        def lookup(key: str) -> str:
            response = httpx.post(f"{router.base_url}/v1/chat/completions", json=ask,
                                  headers={"Authorization": f"Bearer {key}"}, timeout=60)  # fmt: skip
            assert response.status_code == 200, response.text
            return response.headers["x-modelfleet-cache"]

        assert (lookup("sk-a"), lookup("sk-a")) == ("miss", "hit")
        assert lookup("sk-b") == second_lookup
