"""Pure parts of the router: model resolution and the body sent upstream."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from modelfleet.server.api.openai import upstream_body
from modelfleet.server.errors import RouterError
from modelfleet.server.registry import ModelRegistry
from modelfleet.server.schemas import ChatCompletionRequest
from modelfleet.server.services import Services
from modelfleet.server.settings import RouterSettings, StaticModel

pytestmark = pytest.mark.unit

REGISTRY = ModelRegistry(
    [
        StaticModel.model_validate(
            {"name": "llama", "url": "http://127.0.0.1:1/", "upstream_model": "llama3.2:1b", "aliases": ["l"]}
        )
    ]
)


def services(**settings: Any) -> Services:
    return cast(Services, SimpleNamespace(settings=RouterSettings(**settings), registry=REGISTRY))


def test_aliases_resolve_to_one_route_and_unknown_models_are_404() -> None:
    assert REGISTRY.resolve("l") == REGISTRY.resolve("llama")
    assert REGISTRY.resolve("llama").base_url == "http://127.0.0.1:1"
    assert REGISTRY.names() == ["llama"]
    with pytest.raises(RouterError) as missing:
        REGISTRY.resolve("gpt-5")
    assert (missing.value.status, missing.value.code, missing.value.param) == (404, "model_not_found", "model")


def test_upstream_body_renames_the_model_and_applies_the_token_policy() -> None:
    request = ChatCompletionRequest.model_validate({"model": "l", "messages": [{"role": "user", "content": "hi"}],
                                                    "temperature": 0, "stop": ["\n"], "seed": 1})  # fmt: skip
    body = upstream_body(request, REGISTRY.resolve("l"), services(default_max_tokens=99))
    assert body["model"] == "llama3.2:1b"
    assert body["max_tokens"] == 99
    assert (body["temperature"], body["stop"], body["seed"]) == (0, ["\n"], 1)
    assert "n" not in body
    capped = ChatCompletionRequest.model_validate(
        {"model": "l", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5000}
    )
    with pytest.raises(RouterError, match="above this server's limit of 4096"):
        upstream_body(capped, REGISTRY.resolve("l"), services())
