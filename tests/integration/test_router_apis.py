"""The router's other APIs in front of the real Ollama: Responses, /v1/generate(/stream), /infer, admin,
API keys, and the Ollama-native backend.  Shapes and SSE framing are checked line by line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import OllamaServer, RouterServer, hashed_key, running_router, start_router, write_keys_file

pytestmark = pytest.mark.integration

USER_KEY = "mf-user-3f9a1c"
ADMIN_KEY = "mf-admin-77b2e0"


@pytest.fixture(scope="module")
def keyed_router(ollama_server: OllamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterServer]:
    """Keys required; one user key stored as its SHA-256, one admin key; two models: Ollama's /v1 and native."""
    work_dir = tmp_path_factory.mktemp("keyed-router")
    # The admin key in plain text: the router hashes it at load.
    keys_file = write_keys_file(
        work_dir, hashed_key("team-a", USER_KEY), {"name": "ops", "key": ADMIN_KEY, "admin": True}
    )
    models: list[dict[str, object]] = [
        {"name": "gemma", "url": ollama_server.base_url, "upstream_model": ollama_server.model},
        {"name": "gemma-native", "url": ollama_server.base_url, "upstream_model": ollama_server.model,
         "api": "ollama"},
    ]  # fmt: skip
    yield from start_router(work_dir, models, auth_required="true", api_keys_file=str(keys_file),
                            default_model="gemma")  # fmt: skip


def user(key: str = USER_KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def sse_lines(response: httpx.Response) -> list[str]:
    """Every line of an SSE body, checked to be framed as `field: value` lines with blank separators."""
    lines = response.text.split("\n")
    assert lines[-2:] == ["", ""], "an SSE body ends with a blank line"
    for line in lines:
        assert line == "" or line.startswith(("data: ", "event: ", ": ")), f"not an SSE line: {line!r}"
    return [line for line in lines if line]


def test_keys_are_required_and_checked(keyed_router: RouterServer) -> None:
    url = f"{keyed_router.openai_base_url}/models"
    missing = httpx.get(url, timeout=10)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    wrong = httpx.get(url, headers=user("mf-nope"), timeout=10)
    assert wrong.status_code == 401
    assert wrong.json()["error"] == {"message": "Incorrect API key provided.", "type": "authentication_error",
                                     "param": None, "code": "invalid_api_key"}  # fmt: skip
    assert httpx.get(url, headers=user(), timeout=10).status_code == 200
    assert httpx.get(url, headers={"x-api-key": USER_KEY}, timeout=10).status_code == 200


def test_admin_models_needs_an_admin_key(keyed_router: RouterServer) -> None:
    url = f"{keyed_router.base_url}/v1/admin/models"
    assert httpx.get(url, timeout=10).status_code == 401
    forbidden = httpx.get(url, headers=user(), timeout=10)
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["code"] == "admin_required"
    listing = httpx.get(url, headers=user(ADMIN_KEY), timeout=10)
    assert listing.status_code == 200
    models = {model["name"]: model for model in listing.json()["data"]}
    assert set(models) == {"gemma", "gemma-native"}
    native = models["gemma-native"]
    assert native["api"] == "ollama"
    assert native["replicas"] == 1
    assert native["endpoints"][0]["outstanding"] == 0
    assert (native["capacity"], native["in_flight"], native["queue_depth"]) == (4, 0, 0)
    assert native["state"] in {"ready", "unreachable"}  # the prober may not have run yet; it never says unreachable
    assert native["state"] != "unreachable" or native["reachability"] is None


def test_responses_api_with_the_sdk(keyed_router: RouterServer) -> None:
    sdk = openai.OpenAI(base_url=keyed_router.openai_base_url, api_key=USER_KEY, max_retries=0, timeout=120)
    response = sdk.responses.create(model="gemma", input="Say hello.", instructions="Be brief.",
                                    max_output_tokens=16, temperature=0)  # fmt: skip
    assert response.status in {"completed", "incomplete"}
    assert response.output_text.strip()
    assert response.usage is not None
    assert response.usage.output_tokens > 0
    extra = response.model_dump()
    assert set(extra["timings"]) == {"queue_ms", "backend_ms", "total_ms"}
    assert extra["timings"]["total_ms"] >= extra["timings"]["backend_ms"] > 0

    deltas, finals = [], []
    for event in sdk.responses.create(model="gemma", input="Name a fruit.", max_output_tokens=16, stream=True):
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type in {"response.completed", "response.incomplete"}:
            finals.append(event.response)
    assert len(finals) == 1
    assert deltas
    assert "".join(deltas) == finals[0].output_text


def test_responses_sse_events_in_order(keyed_router: RouterServer) -> None:
    body = {"model": "gemma", "input": [{"role": "user", "content": "Count to three."}], "max_output_tokens": 12,
            "stream": True}  # fmt: skip
    response = httpx.post(f"{keyed_router.openai_base_url}/responses", json=body, headers=user(), timeout=120)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = sse_lines(response)
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert len(events) == len(payloads)
    assert [payload["type"] for payload in payloads] == events
    assert [payload["sequence_number"] for payload in payloads] == list(range(1, len(payloads) + 1))
    assert events[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                          "response.content_part.added"]  # fmt: skip
    assert events[-5:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                             "response.metrics"]  # fmt: skip
    assert events[-1] in {"response.completed", "response.incomplete"}
    deltas = [payload["delta"] for payload in payloads if payload["type"] == "response.output_text.delta"]
    assert deltas
    final = payloads[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "".join(deltas)
    assert final["usage"]["output_tokens"] > 0
    assert final["timings"]["total_ms"] > 0


def test_generate_and_infer(keyed_router: RouterServer) -> None:
    body = {"prompt": "Write one word.", "system": "You are terse.", "max_tokens": 8, "temperature": 0}
    first = httpx.post(f"{keyed_router.base_url}/v1/generate", json=body, headers=user(), timeout=120)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert set(answer) == {"text", "model", "cached", "latency_ms", "prompt_tokens", "completion_tokens",
                           "total_tokens", "prompt_tokens_approx", "completion_tokens_approx"}  # fmt: skip
    assert answer["text"]
    assert answer["model"] == "gemma"
    assert answer["cached"] is False
    assert answer["completion_tokens"] > 0
    assert answer["total_tokens"] == answer["prompt_tokens"] + answer["completion_tokens"]
    again = httpx.post(f"{keyed_router.base_url}/v1/generate", json=body, headers=user(), timeout=120).json()
    assert again["cached"] is True
    assert again["text"] == answer["text"]
    fresh = httpx.post(f"{keyed_router.base_url}/v1/generate", json={**body, "use_cache": False}, headers=user(),
                       timeout=120).json()  # fmt: skip
    assert fresh["cached"] is False

    inferred = httpx.post(f"{keyed_router.base_url}/infer", json={"prompt": "Write one word.", "max_tokens": 8},
                          headers={"x-api-key": USER_KEY}, timeout=120)  # fmt: skip
    assert inferred.status_code == 200
    assert set(inferred.json()) == {"response", "latency_ms", "cached", "model"}
    assert inferred.json()["response"]
    assert httpx.post(f"{keyed_router.base_url}/infer", json={"prompt": "x"}, timeout=10).status_code == 401


def test_generate_stream_events(keyed_router: RouterServer) -> None:
    body = {"prompt": "List two animals.", "max_tokens": 16, "model": "gemma-native"}
    response = httpx.post(f"{keyed_router.base_url}/v1/generate/stream", json=body, headers=user(), timeout=120)
    assert response.status_code == 200
    payloads = [json.loads(line.removeprefix("data: ")) for line in sse_lines(response)]
    *tokens, final = payloads
    assert tokens
    assert all(set(p) == {"token", "done", "cached"} and p["done"] is False for p in tokens)
    assert all(p["token"] for p in tokens)
    assert final["done"] is True
    assert final["latency_ms"] > 0
    assert final["cached"] is False
    # Ollama sends one chunk per token, except that tokens holding parts of one UTF-8 character
    # (seen with CJK output) arrive together in one chunk.
    assert final["completion_tokens"] >= len(tokens)
    assert final["completion_tokens"] <= 16


def test_ollama_native_backend_maps_usage(keyed_router: RouterServer) -> None:
    sdk = openai.OpenAI(base_url=keyed_router.openai_base_url, api_key=USER_KEY, max_retries=0, timeout=120)
    chat = sdk.chat.completions.create(model="gemma-native", messages=[{"role": "user", "content": "Hi!"}],
                                       max_tokens=12, stop=["\n\n"], top_p=0.9, seed=7)  # fmt: skip
    assert chat.model == "gemma-native"
    assert chat.choices[0].message.content
    assert chat.usage is not None
    assert chat.usage.prompt_tokens > 0
    assert chat.usage.completion_tokens > 0
    assert chat.choices[0].finish_reason in {"stop", "length"}

    text = sdk.completions.create(model="gemma-native", prompt="The capital of France is", max_tokens=6,
                                  temperature=0)  # fmt: skip
    assert text.choices[0].text
    assert text.usage is not None
    assert text.usage.completion_tokens <= 6

    stream = sdk.chat.completions.create(
        model="gemma-native",
        messages=[{"role": "user", "content": "Hi!"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].choices == []
    assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in chunks)


def test_remote_models_need_allow_remote(ollama_server: OllamaServer, tmp_path: Path) -> None:
    models: list[dict[str, object]] = [
        {"name": "provider", "url": ollama_server.base_url, "upstream_model": ollama_server.model, "remote": True}
    ]
    with running_router(tmp_path, models) as router:
        url = f"{router.openai_base_url}/chat/completions"
        body = {"model": "provider", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        refused = httpx.post(url, json=body, timeout=60)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "remote_not_allowed"
        assert httpx.post(url, json={**body, "allow_remote": True}, timeout=60).status_code == 200


# llm-pool's POST /v1/responses, as its README documents it ----------------------------------------

POOL_METRICS = {"backend_inference_wall_ms", "engine_total_wall_ms", "pool_total_wall_ms", "engine_queue_wait_ms",
                "gpu_time_to_first_token_ms", "engine_prompt_tokens", "engine_output_tokens",
                "engine_tokens_per_second"}  # fmt: skip


def pool_request(stream: bool) -> dict[str, object]:
    """llm-pool's documented inference example, field by field (its model id is one of ours here, and the
    token limit smaller, for this machine)."""
    return {
        "model": "gemma",
        "input": "The weather is pleasant today, and I would like to take a walk in the park after lunch.",
        "instructions": "Translate to Dutch. Return only the translation.",
        "stream": stream,
        "decoding": {"beam_size": 1, "top_k": 1, "top_p": 1.0, "temperature": 0.1, "repetition_penalty": 1.0,
                     "max_tokens": 24},
    }  # fmt: skip


def test_llm_pool_responses_example(keyed_router: RouterServer) -> None:
    response = httpx.post(f"{keyed_router.openai_base_url}/responses", json=pool_request(False), headers=user(),
                          timeout=120)  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["object"], body["model"]) == ("response", "gemma")
    assert body["id"].startswith("resp_")
    assert body["output_text"].strip()
    assert body["output"][0]["text"] == body["output_text"] == body["output"][0]["content"][0]["text"]
    assert body["usage"]["output_tokens"] <= 24, "decoding.max_tokens is the limit"
    metrics = body["metrics"]
    assert set(metrics) >= POOL_METRICS
    # llm-pool's nesting: inference inside engine inside pool.
    assert 0 < metrics["backend_inference_wall_ms"] <= metrics["engine_total_wall_ms"] <= metrics["pool_total_wall_ms"]
    assert metrics["engine_prompt_tokens"] > 0
    assert metrics["engine_output_tokens"] == body["usage"]["output_tokens"]
    assert metrics["engine_tokens_per_second"] > 0


def test_llm_pool_responses_stream_sends_metrics_before_completed(keyed_router: RouterServer) -> None:
    response = httpx.post(f"{keyed_router.openai_base_url}/responses", json=pool_request(True), headers=user(),
                          timeout=120)  # fmt: skip
    assert response.status_code == 200, response.text
    payloads = [json.loads(line.removeprefix("data: ")) for line in sse_lines(response) if line.startswith("data: ")]
    kinds = [payload["type"] for payload in payloads]
    # The events llm-pool documents, in its order; ours adds OpenAI's others between them.
    documented = [kind for kind in kinds if kind in {"response.created", "response.output_text.delta",
                                                      "response.metrics", "response.completed",
                                                      "response.incomplete"}]  # fmt: skip
    assert documented[0] == "response.created"
    assert documented[-2:] in (["response.metrics", "response.completed"], ["response.metrics", "response.incomplete"])
    assert "response.output_text.delta" in documented
    metrics = next(payload["metrics"] for payload in payloads if payload["type"] == "response.metrics")
    assert set(metrics) >= POOL_METRICS
    assert metrics["gpu_time_to_first_token_ms"] > 0, "a streamed answer knows its first token"
    assert payloads[-1]["response"]["output_text"] == "".join(
        payload["delta"] for payload in payloads if payload["type"] == "response.output_text.delta"
    )


def test_the_sdks_responses_stream_helper(keyed_router: RouterServer) -> None:
    sdk = openai.OpenAI(base_url=keyed_router.openai_base_url, api_key=USER_KEY, max_retries=0, timeout=120)
    deltas = []
    # The SDK's helper wants response.completed: a stop string ends this base model's answer (it would
    # run to its token limit, and end with response.incomplete), given as llm-pool's decoding.stop.
    # Greedy decoding, because at the model's default temperature of 1 an answer of 32 tokens with no
    # newline in it is rare but does happen; greedily, this model echoes the prompt and stops at 5 tokens.
    with sdk.responses.stream(model="gemma", input="Name a fruit.", max_output_tokens=32, temperature=0,
                              extra_body={"decoding": {"stop": ["\n"]}}) as stream:  # fmt: skip
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert deltas
    assert final.output_text == "".join(deltas)
    assert final.usage is not None
    assert final.usage.output_tokens > 0


# The seed systems' documented examples, field by field ------------------------------------------


def test_llm_inference_server_generate_example_and_its_cache(keyed_router: RouterServer) -> None:
    """Its README's request, as sent (but a smaller max_tokens): sampled at 0.7, and still served from
    the cache the second time, as that system did (MODELFLEET_SAMPLED_CACHE_ROUTES)."""
    body = {"prompt": "Explain the attention mechanism in transformers.", "max_tokens": 24, "temperature": 0.7,
            "system": "You are a concise technical assistant.", "use_cache": True}  # fmt: skip
    first = httpx.post(f"{keyed_router.base_url}/v1/generate", json=body, headers=user(), timeout=120)
    assert first.status_code == 200, first.text
    answer = first.json()
    documented = {"text": str, "model": str, "cached": bool, "latency_ms": float, "prompt_tokens_approx": int,
                  "completion_tokens_approx": int}  # fmt: skip
    assert {key: type(answer[key]) for key in documented} == documented
    assert (answer["cached"], answer["model"]) == (False, "gemma")
    assert answer["completion_tokens_approx"] > 0
    again = httpx.post(f"{keyed_router.base_url}/v1/generate", json=body, headers=user(), timeout=120).json()
    assert (again["cached"], again["text"]) == (True, answer["text"])
    # The OpenAI API keeps the deterministic-only default: the same request, sampled, is never cached there.
    chat = {"model": "gemma", "messages": [{"role": "system", "content": body["system"]},
                                           {"role": "user", "content": body["prompt"]}],
            "max_tokens": 24, "temperature": 0.7}  # fmt: skip
    for _ in range(2):
        response = httpx.post(f"{keyed_router.openai_base_url}/chat/completions", json=chat, headers=user(),
                              timeout=120)  # fmt: skip
        assert response.headers["x-modelfleet-cache"] == "bypass"


def test_llm_inference_server_stream_example(keyed_router: RouterServer) -> None:
    body = {"prompt": "Explain the attention mechanism in transformers.", "max_tokens": 12, "temperature": 0.7,
            "system": "You are a concise technical assistant.", "use_cache": False}  # fmt: skip
    response = httpx.post(f"{keyed_router.base_url}/v1/generate/stream", json=body, headers=user(), timeout=120)
    assert response.status_code == 200
    *tokens, final = [json.loads(line.removeprefix("data: ")) for line in sse_lines(response)]
    assert tokens
    for event in tokens:  # data: {"token": "The", "done": false, "cached": false}
        assert (type(event["token"]), event["done"], event["cached"]) == (str, False, False)
    # data: {"token": "", "done": true, "latency_ms": 1923.1}
    assert (final["token"], final["done"], type(final["latency_ms"])) == ("", True, float)


def test_llm_inference_server_health_example(keyed_router: RouterServer) -> None:
    health = httpx.get(f"{keyed_router.base_url}/health", timeout=10).json()
    assert (health["status"], health["model"], health["ollama_reachable"]) == ("ok", "gemma", True)
    stats = health["cache_stats"]
    assert set(stats) >= {"size", "max_size", "hits", "misses", "hit_rate", "ttl_seconds"}
    assert 0 <= stats["hit_rate"] <= 1


def test_llm_inference_service_infer_example_and_its_cache(keyed_router: RouterServer) -> None:
    """Its README's curl, as sent (but a smaller max_tokens): X-API-Key, no temperature, and a repeat is
    a cache hit, as that system's Redis cache gave."""
    body = {"prompt": "Explain microservices in one paragraph", "max_tokens": 16}
    first = httpx.post(f"{keyed_router.base_url}/infer", json=body, headers={"X-API-Key": USER_KEY}, timeout=120)
    assert first.status_code == 200, first.text
    answer = first.json()
    documented = {"response": str, "latency_ms": float, "cached": bool, "model": str}
    assert {key: type(answer[key]) for key in documented} == documented
    again = httpx.post(f"{keyed_router.base_url}/infer", json=body, headers={"X-API-Key": USER_KEY}, timeout=120)
    assert (again.json()["cached"], again.json()["response"]) == (True, answer["response"])


def test_static_models_cannot_be_loaded_or_unloaded(keyed_router: RouterServer) -> None:
    """Load and unload scale InferenceModels; a model from the router's own settings is not one."""
    base = f"{keyed_router.base_url}/v1/admin/models"
    for action in ("load", "unload"):
        assert httpx.post(f"{base}/gemma/{action}", headers=user(), timeout=10).status_code == 403
        refused = httpx.post(f"{base}/gemma/{action}", headers=user(ADMIN_KEY), timeout=10)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "model_not_managed"
        assert "router's own settings" in refused.json()["error"]["message"]
        assert httpx.post(f"{base}/nothing/{action}", headers=user(ADMIN_KEY), timeout=10).status_code == 404
    # llm-pool's load takes engine overrides; here the InferenceModel holds them, and saying so beats ignoring them.
    override = httpx.post(f"{base}/gemma/load", json={"n_gpu_layers": 20}, headers=user(ADMIN_KEY), timeout=10)
    assert override.status_code == 400, override.text
    assert override.json()["error"]["param"] == "n_gpu_layers"
    one = httpx.get(f"{base}/gemma-native", headers=user(ADMIN_KEY), timeout=10)
    assert (one.status_code, one.json()["name"], one.json()["managed"]) == (200, "gemma-native", None)


def test_gpu_memory_reports_what_ollama_holds_and_estimates_weights_and_kv_cache(
    keyed_router: RouterServer, ollama_server: OllamaServer
) -> None:
    # A generation first, so that Ollama has the model loaded and reports the context it runs with.
    httpx.post(f"{keyed_router.openai_base_url}/completions", headers=user(), timeout=120,
               json={"model": "gemma", "prompt": "Hi", "max_tokens": 1}).raise_for_status()  # fmt: skip
    assert httpx.get(f"{keyed_router.base_url}/v1/admin/gpu-memory", headers=user(), timeout=10).status_code == 403
    report = httpx.get(f"{keyed_router.base_url}/v1/admin/gpu-memory", headers=user(ADMIN_KEY), timeout=30)
    assert report.status_code == 200, report.text
    by_model = {entry["model"]: entry for entry in report.json()["models"]}
    assert set(by_model) == {"gemma", "gemma-native"}
    gemma = by_model["gemma"]
    assert gemma["gpus"] is None, "a static model's GPUs are not known to the router"

    # Ollama's own account, asked directly, is what the report passes on.
    running = httpx.get(f"{ollama_server.base_url}/api/ps", timeout=10).json()["models"]
    (direct,) = [entry for entry in running if entry["name"] == ollama_server.model]
    (loaded,) = gemma["loaded"]
    assert (loaded["size_bytes"], loaded["vram_bytes"], loaded["context_length"]) == (
        direct["size"], direct["size_vram"], direct["context_length"])  # fmt: skip
    tags = httpx.get(f"{ollama_server.base_url}/api/tags", timeout=10).json()["models"]
    (file_size,) = [entry["size"] for entry in tags if entry["name"] == ollama_server.model]

    estimate, architecture = gemma["estimate"], gemma["architecture"]
    assert architecture["name"] == "gemma3"
    assert estimate["weights_bytes"] == file_size
    assert (estimate["context_length"], estimate["concurrency"]) == (direct["context_length"], 4)
    assert estimate["kv_cache_bytes"] == estimate["kv_bytes_per_token"] * direct["context_length"] * 4
    # What Ollama holds also counts its compute buffers: more than the weights, which it holds in full.
    assert direct["size"] > estimate["weights_bytes"]


def test_llm_pool_models_and_admin_models(keyed_router: RouterServer) -> None:
    """llm-pool's GET /v1/models lists model ids (never replicas) and /v1/admin/models one row per id."""
    listed = httpx.get(f"{keyed_router.openai_base_url}/models", headers=user(), timeout=10).json()
    assert sorted(model["id"] for model in listed["data"]) == ["gemma", "gemma-native"]
    admin = httpx.get(f"{keyed_router.openai_base_url}/admin/models", headers=user(ADMIN_KEY), timeout=10)
    assert admin.status_code == 200
    names = [row["name"] for row in admin.json()["data"]]
    assert sorted(names) == ["gemma", "gemma-native"], "one row per model id"
