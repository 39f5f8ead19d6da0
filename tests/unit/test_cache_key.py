"""The response cache's key in full: every replica, of any version, must derive the same key for a request,
or a cache shared through Redis would miss (and store twice) across a rolling upgrade."""

from __future__ import annotations

import pytest

from modelfleet.server.cache import cache_key

pytestmark = pytest.mark.unit

BODY = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def test_the_key_of_a_request_is_pinned() -> None:
    assert cache_key("m", "chat", BODY) == "ab47bd2ffb67e61b822166d593051afea9b084b953c8c8b76031ec7816c6de52"
    assert cache_key("m", "chat", BODY, namespace="team-a") == (
        "d4e3c510ce95a0b2f5eddc505c07a0982e35243e99e1e554fb4927ff049426f8"
    )


def test_no_namespace_is_the_empty_namespace() -> None:
    assert cache_key("m", "chat", BODY) == cache_key("m", "chat", BODY, namespace="")
    assert cache_key("m", "chat", BODY) != cache_key("m", "completion", BODY)
    assert cache_key("m", "chat", BODY) != cache_key("n", "chat", BODY)
