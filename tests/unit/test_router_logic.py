"""Pure parts of the router: the registry and its replicas, the upstream body, keys, and API translations."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import yaml
from starlette.requests import Request

from modelfleet.server.admission import Generation, first_set, prompt_chars, upstream_body
from modelfleet.server.api.admin import model_state
from modelfleet.server.api.compat import as_chat_request as generate_as_chat
from modelfleet.server.api.responses import as_chat_request as responses_as_chat
from modelfleet.server.auth import KeyRing, Principal
from modelfleet.server.backends.ollama import native_request, openai_logprobs, openai_tool_calls, usage_of
from modelfleet.server.cache import cache_key
from modelfleet.server.errors import RouterError
from modelfleet.server.lifecycle import Drain
from modelfleet.server.metrics import RouterMetrics
from modelfleet.server.model_spec import Management, ModelSpec
from modelfleet.server.ratelimit import Limits
from modelfleet.server.registry import ModelRegistry
from modelfleet.server.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest, ResponsesRequest
from modelfleet.server.services import Services
from modelfleet.server.settings import RouterSettings, StaticModel
from modelfleet.server.workers import WorkerSlot

pytestmark = pytest.mark.unit


def registry_with(*specs: ModelSpec, source: str = "static") -> ModelRegistry:
    registry = ModelRegistry(RouterMetrics.create())
    registry.replace_source(source, specs)
    return registry


LLAMA = StaticModel.model_validate(
    {"name": "llama", "url": "http://127.0.0.1:1/", "upstream_model": "llama3.2:1b", "aliases": ["l"]}
).spec()


def services(registry: ModelRegistry | None = None, **settings: Any) -> Services:
    return cast(
        Services, SimpleNamespace(settings=RouterSettings(**settings), registry=registry or registry_with(LLAMA))
    )


def test_aliases_resolve_to_one_model_and_unknown_models_are_404() -> None:
    registry = registry_with(LLAMA)
    assert registry.resolve("l") is registry.resolve("llama")
    assert registry.resolve("llama").spec.endpoints == ("http://127.0.0.1:1",)
    assert registry.names() == ["llama"]
    with pytest.raises(RouterError) as missing:
        registry.resolve("gpt-5")
    assert (missing.value.status, missing.value.code, missing.value.param) == (404, "model_not_found", "model")


def spec(name: str, *endpoints: str, source: str = "cluster", per_replica: int = 2) -> ModelSpec:
    return ModelSpec(name=name, api="openai", upstream_model=name, endpoints=endpoints,
                     max_in_flight_per_replica=per_replica, source=source)  # fmt: skip


def test_a_source_replaces_its_models_and_capacity_follows_replicas() -> None:
    registry = registry_with(LLAMA)
    registry.replace_source("cluster", [spec("a", "http://10.0.0.1:8000"), spec("b")])
    a, b = registry.resolve("a"), registry.resolve("b")
    assert (a.queue.capacity, b.queue.capacity) == (2, 0), "zero replicas: zero capacity, requests wait"
    registry.replace_source("cluster", [spec("a", "http://10.0.0.1:8000", "http://10.0.0.2:8000")])
    assert registry.resolve("a") is a, "an updated model keeps its queue and load counters"
    assert a.queue.capacity == 4
    assert b.queue.refusal is not None
    assert registry.names() == ["llama", "a"]
    with pytest.raises(RouterError):
        registry.resolve("b")


@pytest.mark.parametrize(("routers", "router_index", "shares"), [(1, 0, [4, 3]), (2, 1, [2, 1])])
def test_worker_processes_share_the_cap_like_more_routers(routers: int, router_index: int, shares: list[int]) -> None:
    """7 slots (7 replicas x 1): the two workers of a lone router take 4 and 3. Two routers of two
    workers are 4 sharers, taking 2, 2, 2 and 1 in order: the second router's workers are the last two."""
    cluster = dataclasses.replace(spec("a", *(f"http://10.0.0.{n}:8000" for n in range(7)), per_replica=1),
                                  routers=routers, router_index=router_index)  # fmt: skip
    capacities = []
    for index in range(2):
        registry = ModelRegistry(RouterMetrics.create(), worker=WorkerSlot(index, 2))
        registry.replace_source("cluster", [cluster])
        capacities.append(registry.resolve("a").queue.capacity)
    assert capacities == shares


def test_static_models_win_name_clashes_with_the_cluster() -> None:
    registry = registry_with(LLAMA)
    registry.replace_source("cluster", [spec("llama", "http://10.0.0.9:8000")])
    assert registry.resolve("llama").spec.source == "static"


def test_least_outstanding_replica_is_picked() -> None:
    registry = registry_with(spec("a", "http://r1", "http://r2", "http://r3"))
    model = registry.resolve("a")
    picks = [model.pick_endpoint() for _ in range(3)]
    assert sorted(picks) == ["http://r1", "http://r2", "http://r3"], "spread before stacking"
    model.release_endpoint("http://r2")
    model.release_endpoint("http://r2")  # releasing twice never goes below zero
    assert model.pick_endpoint() == "http://r2"
    assert model.outstanding == {"http://r1": 1, "http://r2": 1, "http://r3": 1}


def test_picking_with_no_replica_is_503() -> None:
    with pytest.raises(RouterError) as none:
        registry_with(spec("a")).resolve("a").pick_endpoint()
    assert (none.value.status, none.value.code) == (503, "no_ready_replica")


def test_upstream_body_renames_the_model_and_applies_the_token_policy() -> None:
    model = registry_with(LLAMA).resolve("l")
    request = ChatCompletionRequest.model_validate({"model": "l", "messages": [{"role": "user", "content": "hi"}],
                                                    "temperature": 0, "stop": ["\n"], "seed": 1,
                                                    "use_cache": False, "allow_remote": True})  # fmt: skip
    body = upstream_body(request, model, services(default_max_tokens=99))
    assert body["model"] == "llama3.2:1b"
    assert body["max_tokens"] == 99
    assert (body["temperature"], body["stop"], body["seed"]) == (0, ["\n"], 1)
    assert not {"n", "stream", "use_cache", "allow_remote"} & set(body), "router-only fields stay here"
    capped = ChatCompletionRequest.model_validate(
        {"model": "l", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5000}
    )
    with pytest.raises(RouterError, match="above this server's limit of 4096"):
        upstream_body(capped, model, services())


def test_a_lora_adapter_resolves_to_its_model_and_is_asked_for_by_its_own_name() -> None:
    base = dataclasses.replace(spec("gemma", "http://10.0.0.1:8000"), upstream_model="org/gemma",
                               aliases=("g",), adapters=("gemma-pirate",))  # fmt: skip
    registry = registry_with(base, source="cluster")
    model = registry.resolve("gemma-pirate")
    assert model is registry.resolve("gemma") is registry.resolve("g"), "one model: one queue, one cap"

    def asked(name: str) -> str:
        request = ChatCompletionRequest.model_validate({"model": name, "messages": [{"role": "user", "content": "x"}]})
        return str(upstream_body(request, model, services(registry))["model"])

    assert (asked("gemma-pirate"), asked("gemma"), asked("g")) == ("gemma-pirate", "org/gemma", "org/gemma")

    def answered_as(name: str) -> str:
        request = ChatCompletionRequest.model_validate({"model": name, "messages": [{"role": "user", "content": "x"}]})
        body = upstream_body(request, model, services(registry))
        generation = Generation(services(registry), model, "chat", "/v1/chat/completions", body,
                                Principal("k", "key:k"), Limits(None, None), None)  # fmt: skip
        return generation.answer_name

    # An answer names the adapter that wrote it; an alias's answer names the model.
    assert (answered_as("gemma-pirate"), answered_as("gemma"), answered_as("g")) == ("gemma-pirate", "gemma", "gemma")
    # The adapter's answers are its own in the cache: the key follows the upstream body's model.
    body = {"messages": [{"role": "user", "content": "x"}], "temperature": 0}
    assert cache_key("gemma", "chat", {**body, "model": "gemma-pirate"}) != cache_key(
        "gemma", "chat", {**body, "model": "org/gemma"})  # fmt: skip


def test_limits_take_the_first_configured_value_and_zero_means_off() -> None:
    assert first_set(None, 50, 100) == 50
    assert first_set(None, None, 100) == 100
    assert first_set(0, 50, 100) is None
    assert first_set(None, None, None) is None


def request_with(headers: dict[str, str]) -> Request:
    raw = [(name.encode(), value.encode()) for name, value in headers.items()]
    return Request({"type": "http", "headers": raw, "client": ("10.1.2.3", 5555)})


def test_keys_are_held_as_digests_and_roles_are_checked(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"name": "team", "sha256": hashlib.sha256(b"k1").hexdigest(), "requests_per_minute": 7},
        {"name": "ops", "key": "k2", "admin": True},
    ]}))  # fmt: skip
    ring = KeyRing(keys, required=True)
    team = ring.authenticate(request_with({"authorization": "Bearer k1"}))
    assert (team.name, team.subject, team.admin, team.requests_per_minute) == ("team", "key:team", False, 7)
    assert ring.authenticate(request_with({"x-api-key": "k2"})).admin
    assert "k2" not in repr(ring.__dict__), "plain-text keys are dropped after hashing"
    for headers, code in [({}, "missing_api_key"), ({"authorization": "Bearer nope"}, "invalid_api_key")]:
        with pytest.raises(RouterError) as refused:
            ring.authenticate(request_with(headers))
        assert (refused.value.status, refused.value.code) == (401, code)
    with pytest.raises(RouterError) as not_admin:
        ring.require_admin(request_with({"authorization": "Bearer k1"}))
    assert not_admin.value.status == 403


def test_without_required_keys_callers_are_identified_by_address() -> None:
    ring = KeyRing(None, required=False)
    anonymous = ring.authenticate(request_with({"authorization": "Bearer whatever"}))
    assert (anonymous.subject, anonymous.anonymous) == ("ip:10.1.2.3", True)
    with pytest.raises(RouterError):
        ring.require_admin(request_with({}))


def test_a_key_file_must_give_exactly_one_secret(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "x"}]}))
    with pytest.raises(ValueError, match="exactly one of sha256 and key"):
        KeyRing(keys, required=True)


def test_ollama_native_requests_carry_options_and_usage_maps_back() -> None:
    body = {"model": "gemma3:270m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "temperature": 0, "top_p": 0.9, "max_tokens": 12, "seed": 3, "stop": "\n"}  # fmt: skip
    path, request = native_request("chat", body, stream=True)
    assert path == "/api/chat"
    assert request["messages"] == [{"role": "user", "content": "hi"}]
    assert request["options"] == {"temperature": 0, "top_p": 0.9, "num_predict": 12, "seed": 3, "stop": ["\n"]}
    path, request = native_request("completion", {"model": "m", "prompt": "Once"}, stream=False)
    assert (path, request["prompt"], request["raw"]) == ("/api/generate", "Once", True)
    assert usage_of({"prompt_eval_count": 5, "eval_count": 7}) == {
        "prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}  # fmt: skip


def test_completions_take_one_prompt() -> None:
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["only"]}).prompt == "only"
    with pytest.raises(ValueError, match="exactly one prompt"):
        CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]})


def test_responses_and_generate_requests_become_chat_requests() -> None:
    responses = ResponsesRequest.model_validate({"model": "m", "instructions": "Be brief.", "max_output_tokens": 9,
                                                 "input": [{"role": "user", "content": [{"type": "input_text",
                                                                                         "text": "Hi"}]}]})  # fmt: skip
    chat = responses_as_chat(responses)
    assert [(m.role, m.content) for m in chat.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert chat.max_tokens == 9
    generate = GenerateRequest.model_validate({"prompt": "Hi", "system": "Terse.", "temperature": 0})
    only_model = services(registry_with(LLAMA))
    converted = generate_as_chat(generate, only_model)
    assert converted.model == "llama", "the only model is the default"
    assert [(m.role, m.content) for m in converted.messages] == [("system", "Terse."), ("user", "Hi")]
    two_models = services(registry_with(LLAMA, spec("other", "http://r1", source="static")))
    with pytest.raises(RouterError) as ambiguous:
        generate_as_chat(generate, two_models)
    assert ambiguous.value.code == "model_required"


def test_drain_is_over_only_after_its_seconds_since_the_first_signal() -> None:
    drain = Drain(seconds=60)
    assert not drain.draining
    assert not drain.over()
    drain.begin()
    first = drain.started_at
    drain.begin()  # a second signal does not restart the clock
    assert drain.started_at == first
    assert drain.draining
    assert not drain.over()
    assert Drain(seconds=0, started_at=0.0).over()


def test_prompt_chars_counts_text_only() -> None:
    parts = [{"type": "text", "text": "de"}, {"type": "image_url", "image_url": {}}]
    messages = [{"role": "system", "content": "abc"}, {"role": "user", "content": parts}]
    assert prompt_chars(messages) == 5
    assert prompt_chars(["ab", "c"]) == 3
    assert prompt_chars("hello") == 5
    assert prompt_chars(None) == 0


def test_idle_replicas_take_turns() -> None:
    """Under light load every replica is idle between requests: all of them get requests, in turn."""
    model = registry_with(spec("a", "http://r1", "http://r2")).resolve("a")
    picks = []
    for _ in range(4):
        picked = model.pick_endpoint()
        picks.append(picked)
        model.release_endpoint(picked)
    assert picks == ["http://r1", "http://r2", "http://r1", "http://r2"]


# OpenAI fields the router does not act on: passed through, or mapped for Ollama's native API -------

CHAT = {"model": "l", "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def chat_body(**fields: Any) -> dict[str, Any]:
    request = ChatCompletionRequest.model_validate({**CHAT, **fields})
    return upstream_body(request, registry_with(LLAMA).resolve("l"), services())


def test_fields_the_router_does_not_act_on_reach_the_backend_unchanged() -> None:
    fields = {
        "tools": [WEATHER_TOOL], "tool_choice": "auto", "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
        "logprobs": True, "top_logprobs": 3, "logit_bias": {"50256": -100.0}, "user": "u-1",
        "metadata": {"team": "a"}, "guided_json": {"type": "object"}, "options": {"num_ctx": 512},
        "some_future_field": [1, 2],
    }  # fmt: skip
    body = chat_body(**fields)
    assert {key: body[key] for key in fields} == fields


def test_typed_fields_are_validated_before_they_are_forwarded() -> None:
    with pytest.raises(ValueError, match=r"json_schema\.schema"):
        chat_body(response_format={"type": "json_schema", "json_schema": {"name": "w"}})
    with pytest.raises(ValueError, match="response_format"):
        chat_body(response_format={"type": "yaml"})
    with pytest.raises(ValueError, match="top_logprobs"):
        chat_body(logprobs=True, top_logprobs=21)


def test_a_vendor_token_limit_is_held_to_the_servers_limit() -> None:
    with pytest.raises(RouterError, match="above this server's limit"):
        chat_body(options={"num_predict": 100_000})
    assert chat_body(options={"num_predict": 50})["max_tokens"] == 50


def test_the_cache_key_changes_with_every_field_that_changes_the_answer() -> None:
    plain = cache_key("m", "chat", chat_body(temperature=0))
    for fields in ({"tools": [WEATHER_TOOL]}, {"response_format": {"type": "json_object"}}, {"logprobs": True},
                   {"guided_json": {"type": "object"}}, {"options": {"num_ctx": 512}}):  # fmt: skip
        assert cache_key("m", "chat", chat_body(temperature=0, **fields)) != plain, fields
    for fields in ({"user": "someone"}, {"metadata": {"team": "a"}}):  # change nothing in the answer
        assert cache_key("m", "chat", chat_body(temperature=0, **fields)) == plain, fields


def test_ollama_native_requests_map_formats_tools_and_logprobs() -> None:
    def native(**fields: Any) -> dict[str, Any]:
        return native_request("chat", chat_body(**fields), stream=False)[1]

    assert native(response_format={"type": "json_object"})["format"] == "json"
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    assert (
        native(response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})["format"]
        == schema
    )
    assert "format" not in native(response_format={"type": "text"})
    assert native(format="json")["format"] == "json", "Ollama's own field, as a vendor extension"
    assert native(tools=[WEATHER_TOOL])["tools"] == [WEATHER_TOOL]
    assert "tools" not in native(tools=[WEATHER_TOOL], tool_choice="none"), "none: the model gets no tools"
    with_logprobs = native(logprobs=True, top_logprobs=2)
    assert (with_logprobs["logprobs"], with_logprobs["top_logprobs"]) == (True, 2)
    merged = native(options={"num_ctx": 512, "temperature": 1.5, "num_predict": 7}, temperature=0.2, max_tokens=9)
    assert merged["options"]["num_ctx"] == 512
    assert (merged["options"]["temperature"], merged["options"]["num_predict"]) == (0.2, 9), "OpenAI fields win"
    assert native(user="u", metadata={"a": "b"}).keys() == native().keys(), "nothing to send, nothing lost"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required", "tools": [WEATHER_TOOL]}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "weather"}}, "tools": [WEATHER_TOOL]},
         "tool_choice"),
        ({"parallel_tool_calls": False, "tools": [WEATHER_TOOL]}, "parallel_tool_calls"),
        ({"logit_bias": {"1": 5.0}}, "logit_bias"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, "messages"),
    ],
)  # fmt: skip
def test_what_ollamas_native_api_cannot_do_is_a_clear_400(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(RouterError) as refused:
        native_request("chat", chat_body(**fields), stream=False)
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, "unsupported_parameter", param)
    assert param in refused.value.message


def test_a_tool_conversation_and_images_map_to_ollamas_messages() -> None:
    messages = [
        {"role": "user", "content": [
            {"type": "text", "text": "What is this, and the weather?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    native = native_request("chat", chat_body(messages=messages, tools=[WEATHER_TOOL]), stream=False)[1]["messages"]
    assert native[0] == {"role": "user", "content": "What is this, and the weather?", "images": ["iVBORw0KGgo="]}
    assert native[1]["tool_calls"] == [
        {"id": "call_1", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    ]
    assert native[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1", "tool_name": "weather"}


def test_ollamas_tool_calls_and_logprobs_come_back_in_openais_shape() -> None:
    calls = openai_tool_calls([{"function": {"index": 0, "name": "weather", "arguments": {"city": "Paris"}}}],
                              streamed=True)  # fmt: skip
    (call,) = calls
    assert call["id"].startswith("call_")
    assert {k: call[k] for k in ("index", "type", "function")} == {
        "index": 0, "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}  # fmt: skip
    entry = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": [{"token": "Hi", "logprob": -0.1}]}
    assert openai_logprobs({"logprobs": [entry]}) == {"content": [entry]}
    assert openai_logprobs({}) is None


def test_llm_pools_decoding_fills_what_the_top_level_fields_leave_unset() -> None:
    request = ResponsesRequest.model_validate({
        "model": "l", "input": "Hi", "temperature": 0.7,
        "decoding": {"temperature": 0.1, "top_p": 0.9, "top_k": 1, "max_tokens": 5, "stop": ["\n"],
                     "repetition_penalty": 1.1, "beam_size": 4},
    })  # fmt: skip
    chat = upstream_body(responses_as_chat(request), registry_with(LLAMA).resolve("l"), services())
    assert chat["temperature"] == 0.7, "the top-level field wins"
    assert (chat["top_p"], chat["max_tokens"], chat["stop"]) == (0.9, 5, ["\n"])
    assert (chat["top_k"], chat["repetition_penalty"]) == (1, 1.1), "forwarded: vLLM reads them, Ollama maps them"
    assert "beam_size" not in chat, "accepted and ignored"
    native = native_request("chat", chat, stream=False)[1]["options"]
    assert (native["top_k"], native["repeat_penalty"], native["num_predict"]) == (1, 1.1, 5)
    with pytest.raises(ValueError, match="decoding"):
        ResponsesRequest.model_validate({"model": "gemma", "input": "Hi", "decoding": {"temprature": 0}})


def test_an_unloaded_model_refuses_at_once_and_a_load_admits_again() -> None:
    """Waiting requests fail when the model is unloaded (nothing will bring a replica), not at their deadline."""
    asyncio.run(unload_and_load())


async def unload_and_load() -> None:
    registry = registry_with(LLAMA)
    management = Management(replicas=1, autoscaled=False, load_replicas=1, pods=0, gpus_per_replica=1,
                            gpu_resource="nvidia.com/gpu", phase="Loading")  # fmt: skip
    served = ModelSpec(name="m", api="ollama", upstream_model="m", endpoints=(), source="cluster", managed=management)
    registry.replace_source("cluster", [served])
    queue = registry.resolve("m").queue
    ticket = queue.admit()
    assert not ticket.granted, "no replica: the request waits"

    unloaded = dataclasses.replace(served, managed=dataclasses.replace(management, replicas=0))
    seen = asyncio.ensure_future(registry.wait_until(lambda: registry.resolve("m").spec == unloaded, seconds=10))
    registry.replace_source("cluster", [unloaded])
    assert await seen, "a waiter sees the change"
    with pytest.raises(RouterError) as waiting:
        await ticket.wait(5)
    assert (waiting.value.status, waiting.value.code) == (503, "model_unloaded")
    assert "POST /v1/admin/models/m/load" in waiting.value.message
    with pytest.raises(RouterError) as refused:
        queue.admit()
    assert refused.value.code == "model_unloaded"
    assert refused.value is not queue.refusal, "each request gets its own exception"

    registry.replace_source("cluster", [served])
    assert queue.refusal is None
    assert not queue.admit().granted, "loaded again, a request waits for a replica as before"


def test_a_probe_of_other_replicas_does_not_make_a_model_unreachable() -> None:
    """Probed while it had no replica (unreachable then); once a replica is ready, that probe is stale."""
    registry = registry_with(LLAMA)
    registry.replace_source("cluster", [spec("m")])
    services = cast(Services, SimpleNamespace(reachability={}))
    services.reachability["m"] = {"reachable": False, "failing": [], "endpoints": []}
    model = registry.resolve("m")
    assert model_state(model, services) == "no_ready_replicas"
    registry.replace_source("cluster", [spec("m", "http://10.0.0.1:8000")])
    assert model_state(model, services) == "ready"
    services.reachability["m"] = {"reachable": False, "failing": ["x"], "endpoints": ["http://10.0.0.1:8000"]}
    assert model_state(model, services) == "unreachable"
