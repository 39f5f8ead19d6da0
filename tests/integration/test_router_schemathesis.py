"""Schemathesis against the router's own OpenAPI, in front of the real Ollama (hostile input).

A bounded, reproducible run: a fixed number of examples per operation, a fixed seed, deterministic
generation, no shrinking and no example database.  Every response must be no 5xx, carry a documented
status and content type, and match the documented schema (the OpenAI error body for every error;
each server-sent event of a stream).  The OpenAPI's request examples run first; then half of the
generated bodies name the served model, so valid ones really reach Ollama, capped at a few tokens.
With API keys required, no key and a wrong key must be 401s and a user key on the admin API a 403,
all in the documented shape.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from modelfleet.server.app import create_app
from modelfleet.server.settings import RouterSettings
from tests.conftest import OllamaServer, RouterServer, hashed_key, running_router, write_keys_file

pytestmark = pytest.mark.integration

SEED = 8  # any fixed value makes CI reproducible
# Examples per operation (fuzzing phase); raise them locally for a longer hunt, e.g. MODELFLEET_FUZZ_EXAMPLES=200.
MAX_EXAMPLES = int(os.environ.get("MODELFLEET_FUZZ_EXAMPLES", "20"))
KEYED_MAX_EXAMPLES = max(1, MAX_EXAMPLES // 4)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
SERVED = "gemma"
USER_KEY = "mf-user-schemathesis"
ADMIN_KEY = "mf-admin-schemathesis"
# Few tokens per generation: fuzzed requests that are valid reach Ollama, and must stay cheap.
TOKEN_CAP = 8
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
ROUTER_SETTINGS = {"max_tokens_cap": str(TOKEN_CAP), "default_max_tokens": str(TOKEN_CAP), "default_model": SERVED}


def fuzz_config(max_examples: int, examples: bool) -> schemathesis.Config:
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "suppress-health-check": ["too_slow", "filter_too_much"],
        "request-timeout": 60,
        "generation": {"mode": "all", "max-examples": max_examples, "deterministic": True, "no-shrink": True,
                       "database": "none"},
        "phases": {"examples": {"enabled": examples}, "coverage": {"enabled": False}, "fuzzing": {"enabled": True},
                   "stateful": {"enabled": False}},
    })  # fmt: skip


def served(body: dict[str, Any]) -> dict[str, Any]:
    """`body` for the served model, its integer token limits within the router's cap (so it may reach Ollama)."""
    limits = {
        field: value % TOKEN_CAP + 1
        for field, value in body.items()
        if field in TOKEN_FIELDS and type(value) is int and value > 0
    }
    return {**body, "model": SERVED, **limits}


def load_schema(max_examples: int, examples: bool = True) -> schemathesis.BaseSchema:
    """The router's OpenAPI, with half of the JSON bodies naming the served model.

    Loaded at import, as `parametrize()` needs (schemathesis' fixture-based loader does not work with
    pytest 9.2); `test_the_running_router_serves_this_openapi` proves the real process serves the same.
    """
    schema = schemathesis.openapi.from_dict(OPENAPI, config=fuzz_config(max_examples, examples))

    @schema.hook
    def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
        if not isinstance(body, dict):
            return st.just(body)
        return st.sampled_from([body, served(body)])

    return schema


OPENAPI = create_app(RouterSettings(auth_required=False)).openapi()
open_api = load_schema(MAX_EXAMPLES)
keyed_api = load_schema(KEYED_MAX_EXAMPLES, examples=False)  # the examples phase cannot fill in `key`


def models(ollama: OllamaServer) -> list[dict[str, object]]:
    return [{"name": ollama.model, "url": ollama.base_url, "aliases": [SERVED]}]


@pytest.fixture(scope="module")
def open_router(ollama_server: OllamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterServer]:
    with running_router(tmp_path_factory.mktemp("fuzzed-router"), models(ollama_server), **ROUTER_SETTINGS) as router:
        yield router


@pytest.fixture(scope="module")
def keyed_router(ollama_server: OllamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterServer]:
    work_dir = tmp_path_factory.mktemp("fuzzed-keyed-router")
    keys_file = write_keys_file(work_dir, hashed_key("fuzz", USER_KEY), hashed_key("ops", ADMIN_KEY, admin=True))
    with running_router(work_dir, models(ollama_server), auth_required="true", api_keys_file=str(keys_file),
                        **ROUTER_SETTINGS) as router:  # fmt: skip
        yield router


def validate(router: RouterServer, case: schemathesis.Case, headers: dict[str, str] | None = None) -> None:
    case.call_and_validate(base_url=router.base_url, headers=headers, checks=CHECKS)


def test_the_running_router_serves_this_openapi(open_router: RouterServer) -> None:
    assert httpx.get(f"{open_router.base_url}/openapi.json", timeout=10).json() == OPENAPI


@open_api.parametrize()
def test_router_conforms_to_its_openapi(open_router: RouterServer, case: schemathesis.Case) -> None:
    validate(open_router, case)


@keyed_api.parametrize()
@keyed_api.given(key=st.sampled_from([None, "mf-not-a-key", USER_KEY, ADMIN_KEY]))
def test_router_with_keys_conforms_to_its_openapi(
    keyed_router: RouterServer, case: schemathesis.Case, key: str | None
) -> None:
    validate(keyed_router, case, headers=None if key is None else {"authorization": f"Bearer {key}"})
