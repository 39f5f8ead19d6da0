"""The token budget's refund rules, as docs/router.md states them: a finished answer is charged its real count
(the rest of its reservation refunded), a cache hit and a failure are refunded in full. Read off the
router's own `x-ratelimit-remaining-tokens` at each admission, in front of a recording backend that
reports the usage it wants counted (tests/support/recording_backend.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import hashed_key, running_router, write_keys_file
from tests.support.recording_backend import recording_backend

pytestmark = pytest.mark.integration

USED = 20  # prompt + completion tokens the backend reports for each answer
BUDGET = 1000


def scripted(body: dict[str, Any]) -> tuple[int, dict[str, Any]] | dict[str, Any]:
    if body["messages"][-1]["content"] == "Count C.":
        return 500, {"error": {"message": "the engine crashed"}}
    choice = {"index": 0, "message": {"role": "assistant", "content": "one two"}, "finish_reason": "stop"}
    return {"id": "c", "object": "chat.completion", "created": 1, "model": "scripted", "choices": [choice],
            "usage": {"prompt_tokens": 5, "completion_tokens": USED - 5, "total_tokens": USED}}  # fmt: skip


def test_an_answer_is_charged_its_real_count_and_a_hit_or_a_failure_nothing(tmp_path: Path) -> None:
    keys = write_keys_file(tmp_path, hashed_key("team", "sk-team", tokens_per_minute=BUDGET))
    with recording_backend(scripted) as backend:
        models: list[dict[str, object]] = [{"name": "m", "url": backend.base_url, "upstream_model": "scripted"}]
        with running_router(tmp_path, models, api_keys_file=str(keys), auth_required="true") as router:

            def remaining_at_admission(prompt: str) -> int | None:
                # Same length for every prompt, so every request reserves the same (prompt estimate + 100).
                body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 100,
                        "temperature": 0}  # fmt: skip
                response = httpx.post(f"{router.base_url}/v1/chat/completions", json=body,
                                      headers={"Authorization": "Bearer sk-team"}, timeout=30)  # fmt: skip
                if response.status_code != 200:
                    assert response.status_code == 502, response.text  # an error carries no budget headers
                    return None
                return int(response.headers["x-ratelimit-remaining-tokens"])

            first = remaining_at_admission("Count A.")
            second = remaining_at_admission("Count B.")
            hit = remaining_at_admission("Count B.")  # the same deterministic request: a cache hit
            third = remaining_at_admission("Count D.")
            assert remaining_at_admission("Count C.") is None  # the backend fails
            fourth = remaining_at_admission("Count E.")
    assert first is not None
    assert first < BUDGET, "the reservation counts at admission"
    assert (first, second, hit, third, fourth) == (
        first,
        first - USED,
        first - 2 * USED,
        first - 2 * USED,
        first - 3 * USED,
    ), "each answer is charged its real count (not its reservation), the cache hit and the failure nothing"
