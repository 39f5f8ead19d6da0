"""litellm, used as a client library (`openai/` models at an `api_base`), against the router in front of the
real Ollama and Gemma 3 270M.

litellm needs python-dateutil<3 and the kubernetes client in .venv needs >=3, so litellm has its own venv
(`make install-litellm`) and tests/clients/litellm_client.py makes the calls there, in one subprocess, and
prints what litellm returned or raised as JSON.  The tests below assert on that.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import OllamaServer, RouterServer, hashed_key, settled_chat_calls, start_router, write_keys_file

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LITELLM_PYTHON = ROOT / ".venv-litellm" / "bin" / "python"
CLIENT = ROOT / "tests" / "clients" / "litellm_client.py"
USER_KEY = "mf-litellm-5d21c8"
MAX_TOKENS = 16  # as the client script asks


@pytest.fixture(scope="module")
def litellm_router(ollama_server: OllamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterServer]:
    """Keys required, as in production; the cache off, so that each generation litellm asks for reaches Ollama
    (a cached answer replayed as a stream would not test litellm's reading of a live one)."""
    work_dir = tmp_path_factory.mktemp("litellm-router")
    keys_file = write_keys_file(work_dir, hashed_key("litellm", USER_KEY))
    models: list[dict[str, object]] = [
        {"name": "gemma", "url": ollama_server.base_url, "upstream_model": ollama_server.model}
    ]
    yield from start_router(work_dir, models, auth_required="true", api_keys_file=str(keys_file), cache_size="0")


@pytest.fixture(scope="module")
def results(
    litellm_router: RouterServer, ollama_server: OllamaServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The client script's JSON, plus `backend_calls`: how many chat requests Ollama finished meanwhile."""
    if not LITELLM_PYTHON.exists():
        pytest.fail(f"{LITELLM_PYTHON} is missing; run `make install-litellm`", pytrace=False)
    before = settled_chat_calls(ollama_server)
    # No inherited OPENAI_* or proxy variables: litellm reads them, and the test names every setting itself.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path_factory.mktemp("litellm-home"))}
    argv = [str(LITELLM_PYTHON), str(CLIENT), "--api-base", litellm_router.openai_base_url,
            "--api-key", USER_KEY, "--model", "gemma"]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"the litellm client failed:\n{done.stderr}"
    out: dict[str, Any] = json.loads(done.stdout)
    out["backend_calls"] = settled_chat_calls(ollama_server) - before
    return out


def test_completion(results: dict[str, Any]) -> None:
    completion = results["completion"]
    assert completion["type"] == "ModelResponse"
    assert completion["model"] == "gemma"
    assert completion["role"] == "assistant"
    assert completion["text"].strip()
    usage = completion["usage"]
    assert 0 < usage["completion_tokens"] <= MAX_TOKENS
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # "length" exactly when the answer used every token it was allowed.
    assert completion["finish_reason"] == ("length" if usage["completion_tokens"] == MAX_TOKENS else "stop")


@pytest.mark.parametrize("call", ["stream", "async_stream"], ids=["completion", "acompletion"])
def test_stream_joins_to_the_same_text_and_ends_with_usage(results: dict[str, Any], call: str) -> None:
    """At temperature 0 the streamed answer is the non-streamed one, token for token; the pieces an
    application joins, litellm's own stream_chunk_builder and the usage chunk all agree with it."""
    stream, completion = results[call], results["completion"]
    assert stream["chunk_types"] == ["ModelResponseStream"]
    assert stream["content_chunks"] > 1, "the answer came in pieces, not as one block"
    assert stream["text"] == completion["text"]
    assert stream["rebuilt_text"] == completion["text"]
    assert stream["models"] == ["gemma"]
    assert stream["finish_reasons"] == [completion["finish_reason"]]
    # stream_options.include_usage: one chunk carries the usage, the same counts as the non-streamed call.
    assert stream["usages"] == [completion["usage"]]
    assert stream["rebuilt_usage"] == completion["usage"]


def test_router_errors_become_litellms_exceptions(results: dict[str, Any]) -> None:
    """The router's OpenAI-style errors reach the application as litellm's typed exceptions, which are also
    the openai SDK's, with the status and the router's own message."""
    unknown, bad_key = results["unknown_model"], results["bad_key"]
    assert unknown["type"] == "NotFoundError"
    assert {"litellm.exceptions.NotFoundError", "openai.NotFoundError"} <= set(unknown["bases"])
    assert unknown["status_code"] == 404
    assert "The model `no-such-model` does not exist." in unknown["message"]
    assert bad_key["type"] == "AuthenticationError"
    assert {"litellm.exceptions.AuthenticationError", "openai.AuthenticationError"} <= set(bad_key["bases"])
    assert bad_key["status_code"] == 401
    assert "Incorrect API key provided." in bad_key["message"]


def test_each_generation_reached_ollama_once(results: dict[str, Any]) -> None:
    """The completion and the two streams each ran on Ollama once (the cache is off and nothing retried);
    the unknown model and the bad key were refused by the router before any backend call."""
    assert results["backend_calls"] == 3
