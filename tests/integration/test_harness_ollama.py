"""The real Ollama (our CPU build) serves the real Gemma 3 270M through its native and OpenAI APIs."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from hack import ollama_model
from hack.build_tools import amx_instruction_count
from tests.conftest import OllamaServer, start_ollama

pytestmark = [pytest.mark.integration, pytest.mark.harness]

CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def test_tags_lists_the_model(ollama_server: OllamaServer) -> None:
    tags = httpx.get(f"{ollama_server.base_url}/api/tags", timeout=10).json()
    names = [model["name"] for model in tags["models"]]
    assert names == ["gemma3:270m"]
    details = tags["models"][0]["details"]
    assert details["family"] == "gemma3"
    assert details["quantization_level"] == "Q4_K_M"


def test_native_chat_streams_ndjson_with_a_final_done_object(ollama_server: OllamaServer) -> None:
    body = {"model": ollama_server.model, "messages": CHAT, "stream": True, "options": {"num_predict": 24, "seed": 7}}
    lines = []
    with httpx.stream("POST", f"{ollama_server.base_url}/api/chat", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [line for line in response.iter_lines() if line]
    chunks = [json.loads(line) for line in lines]
    assert len(chunks) >= 3
    *partial, final = chunks
    assert all(chunk["done"] is False for chunk in partial)
    assert all(chunk["message"]["role"] == "assistant" for chunk in partial)
    text = "".join(chunk["message"]["content"] for chunk in partial)
    assert text.strip(), "the model generated no text"
    assert sum(1 for chunk in partial if chunk["message"]["content"]) >= 2, "expected token-by-token streaming"
    assert final["done"] is True
    assert final["eval_count"] > 0
    assert final["prompt_eval_count"] > 0
    assert final["done_reason"] in {"stop", "length"}


def test_openai_chat_streams_sse_then_usage_then_done(ollama_server: OllamaServer) -> None:
    body = {
        "model": ollama_server.model,
        "messages": CHAT,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 24,
        "seed": 7,
    }
    with httpx.stream("POST", f"{ollama_server.openai_base_url}/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw_lines = list(response.iter_lines())
    # SSE framing: every event is one `data: ` line followed by a blank line.
    events = [line for line in raw_lines if line]
    assert all(line.startswith("data: ") for line in events), events
    assert raw_lines[-1] == "" or raw_lines[-1] == "data: [DONE]"
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    *content_chunks, usage_chunk = payloads
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in payloads)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content_chunks).strip()
    assert content_chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def generate(server: OllamaServer, prompt: str, **options: object) -> str:
    body = {"model": server.model, "prompt": prompt, "stream": False, "options": options}
    response = httpx.post(f"{server.base_url}/api/generate", json=body, timeout=120)
    response.raise_for_status()
    text: str = response.json()["response"]
    return text


def test_temperature_zero_with_a_fixed_seed_repeats_itself(ollama_server: OllamaServer) -> None:
    prompt = "The capital of France is"
    first = generate(ollama_server, prompt, temperature=0, seed=1234, num_predict=32)
    second = generate(ollama_server, prompt, temperature=0, seed=1234, num_predict=32)
    assert first.strip()
    assert first == second


def test_cold_start_and_first_answer_are_measured(tmp_path: Path, record_property: pytest.RecordProperty) -> None:
    """A fresh server: start, load the model, answer. The figures are recorded, not asserted.

    Speed goals belong to benchmarks (hack/ollama_model.py bench); this test proves that a cold
    start works end to end and reports how long it took on this run.
    """
    started = time.monotonic()
    servers = start_ollama(tmp_path)
    server = next(servers)
    try:
        ready_seconds = time.monotonic() - started
        response = httpx.post(
            f"{server.base_url}/api/chat",
            json={"model": server.model, "messages": CHAT, "stream": False, "options": {"num_predict": 8}},
            timeout=120,
        ).json()
        first_answer_seconds = time.monotonic() - started
    finally:
        servers.close()
    assert response["message"]["content"].strip()
    assert response["load_duration"] > 0
    assert server.process.process.poll() is not None, "the server must be stopped after the test"
    record_property("ollama_ready_seconds", round(ready_seconds, 3))
    record_property("ollama_cold_first_answer_seconds", round(first_answer_seconds, 3))
    print(f"cold start: ready {ready_seconds:.2f}s, first answer {first_answer_seconds:.2f}s")


def test_the_build_has_no_amx_instructions() -> None:
    """The AMX hazard: ggml's AMX kernels crashed here. Our build must contain none."""
    binary = ollama_model.ollama_binary().resolve()
    libraries = sorted((binary.parent.parent / "lib" / "ollama").glob("libggml-cpu-*.so"))
    assert libraries, "the ggml CPU variant libraries must sit in ../lib/ollama next to the binary"
    assert not any("sapphirerapids" in lib.name for lib in libraries)
    for artefact in [binary, *libraries]:
        disassembly = subprocess.run(
            ["objdump", "-d", "--no-show-raw-insn", str(artefact)], capture_output=True, text=True, check=True
        ).stdout
        assert amx_instruction_count(disassembly) == 0, artefact
