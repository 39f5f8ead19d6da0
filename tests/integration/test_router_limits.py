"""Rate limits through the router, in front of the real Ollama: requests, tokens, window edges, per key."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import OllamaServer, RouterServer, hashed_key, running_router, write_keys_file
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration

TINY = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "use_cache": False}


def ask(router: RouterServer, key: str | None = None, model: str = "gemma3:270m", **extra: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{router.openai_base_url}/chat/completions", json={"model": model, **TINY, **extra},
                      headers=headers, timeout=60)  # fmt: skip


def in_flight(router: RouterServer) -> float:
    lines = httpx.get(f"{router.base_url}/metrics", timeout=5).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("modelfleet_in_flight_requests{"))


def test_request_n_plus_one_is_refused_with_retry_after(ollama_server: OllamaServer, tmp_path: Path) -> None:
    models: list[dict[str, object]] = [{"name": ollama_server.model, "url": ollama_server.base_url}]
    with running_router(tmp_path, models, rate_limit_requests_per_minute="3") as router:
        answers = [ask(router) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert [a.headers["x-ratelimit-limit"] for a in answers] == ["3", "3", "3"]
        assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["2", "1", "0"]
        assert all(1 <= int(a.headers["x-ratelimit-reset"]) <= 60 for a in answers)
        refused = ask(router)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_requests"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["x-ratelimit-remaining"] == "0"
        metrics = httpx.get(f"{router.base_url}/metrics", timeout=5).text
        assert 'modelfleet_rate_limited_requests_total{limit="requests",model="gemma3:270m"} 1.0' in metrics


def test_no_more_than_the_limit_passes_across_a_window_edge(ollama_server: OllamaServer, tmp_path: Path) -> None:
    """Hammer until more than two windows' worth passed; any `limit + 1` admitted requests must span
    more than a window.

    The server admits request i at some instant between its send and its answer, so the sound check
    is: answer time of request i+limit minus send time of request i >= window.  A fixed window (the
    LiteLLM behaviour) lets 2 x limit through around each edge and fails this.
    """
    limit, window = 4, 2.0
    models: list[dict[str, object]] = [{"name": ollama_server.model, "url": ollama_server.base_url}]
    with running_router(
        tmp_path, models, rate_limit_requests_per_minute=str(limit), rate_limit_window_seconds=str(window)
    ) as router:
        admitted: list[tuple[float, float]] = []
        refused = 0
        # Until the window has moved at least twice, however slowly a busy machine answers; the deadline
        # only bounds a hang.
        deadline = time.monotonic() + 60 * window
        with httpx.Client(timeout=60) as client:
            while (len(admitted) <= 2 * limit or not refused) and time.monotonic() < deadline:
                sent = time.monotonic()
                response = client.post(f"{router.openai_base_url}/chat/completions",
                                       json={"model": ollama_server.model, **TINY})  # fmt: skip
                if response.status_code == 200:
                    admitted.append((sent, time.monotonic()))
                else:
                    assert response.status_code == 429
                    refused += 1
        assert refused > 0
        assert len(admitted) >= 2 * limit, "the window slides: more requests pass as it moves"
        for first, later in zip(admitted, admitted[limit:], strict=False):
            assert later[1] - first[0] >= window, f"{limit + 1} requests within {later[1] - first[0]:.2f}s"


def test_token_budget(ollama_server: OllamaServer, tmp_path: Path) -> None:
    models: list[dict[str, object]] = [{"name": ollama_server.model, "url": ollama_server.base_url}]
    with running_router(tmp_path, models, rate_limit_tokens_per_minute="8") as router:
        first = ask(router, max_tokens=4)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "8"
        used = first.json()["usage"]["total_tokens"]
        assert used > 8, "the chat-templated prompt alone is over 8 tokens"
        refused = ask(router)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_tokens"
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


def test_a_request_reserves_its_most_and_is_refunded_what_it_did_not_use(
    ollama_server: OllamaServer, tmp_path: Path
) -> None:
    """Budget 400: each request reserves its prompt's estimate plus max_tokens 150 at admission, and is
    charged its real count at the end.  Greedy decoding with a stop string ends these answers after a
    few tokens, so three such requests fit only because each one's unused reservation came back."""
    models: list[dict[str, object]] = [{"name": ollama_server.model, "url": ollama_server.base_url}]
    short = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 150, "temperature": 0,
             "stop": ["\n"], "use_cache": False}  # fmt: skip
    with running_router(tmp_path, models, rate_limit_tokens_per_minute="400") as router:
        url = f"{router.openai_base_url}/chat/completions"
        first = httpx.post(url, json={"model": ollama_server.model, **short}, timeout=60)
        assert first.status_code == 200, first.text
        # Admission counted the reservation: 400 - (4 for the prompt's 13 characters + 150).
        assert first.headers["x-ratelimit-remaining-tokens"] == "246"
        used = first.json()["usage"]["total_tokens"]
        assert used < 150, "a short answer, for the refund to be visible"

        streaming = {"model": ollama_server.model, **short, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url, json=streaming, timeout=60) as streamed:
            assert streamed.status_code == 200
            assert int(streamed.headers["x-ratelimit-remaining-tokens"]) == 400 - used - 154
            streamed.read()
        third = httpx.post(url, json={"model": ollama_server.model, **short}, timeout=60)
        assert third.status_code == 200, f"the first two's unused reservations were not refunded: {third.text}"
        assert int(third.headers["x-ratelimit-remaining-tokens"]) < 400 - 154

        too_large = httpx.post(url, json={"model": ollama_server.model, **short, "max_tokens": 500}, timeout=60)
        assert too_large.status_code == 400, too_large.text
        assert too_large.json()["error"]["code"] == "tokens_exceed_limit"
        assert too_large.json()["error"]["param"] == "max_tokens"
        assert "lower max_tokens" in too_large.json()["error"]["message"]


def test_a_stream_the_client_leaves_gives_its_reservation_back(ollama_server: OllamaServer, tmp_path: Path) -> None:
    """The generation is cancelled when the client leaves; its reservation must not stay charged."""
    models: list[dict[str, object]] = [{"name": ollama_server.model, "url": ollama_server.base_url}]
    body = {"model": ollama_server.model, "messages": [{"role": "user", "content": "Count to one hundred."}],
            "max_tokens": 300, "stream": True, "use_cache": False}  # fmt: skip
    with running_router(tmp_path, models, rate_limit_tokens_per_minute="400") as router:
        url = f"{router.openai_base_url}/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=60) as left:
            assert left.status_code == 200
            next(left.iter_lines())  # the first chunk; then the client leaves
        # Event, not clock: the router has let go of the first stream (its slot is free).
        wait_until(lambda: in_flight(router) == 0, timeout=30)
        # 300 + the prompt fits in 400 only if the first stream's reservation came back.
        again = httpx.post(url, json={**body, "stream": False, "max_tokens": 300}, timeout=120)
        assert again.status_code == 200, f"the left stream's reservation was kept: {again.text}"


def test_keys_have_their_own_budgets_and_overrides(ollama_server: OllamaServer, tmp_path: Path) -> None:
    keys_file = write_keys_file(tmp_path, hashed_key("a", "key-a"), hashed_key("b", "key-b", requests_per_minute=1))
    models: list[dict[str, object]] = [{"name": ollama_server.model, "url": ollama_server.base_url}]
    with running_router(
        tmp_path, models, auth_required="true", api_keys_file=str(keys_file), rate_limit_requests_per_minute="2"
    ) as router:
        assert [ask(router, "key-a").status_code for _ in range(3)] == [200, 200, 429]
        assert [ask(router, "key-b").status_code for _ in range(2)] == [200, 429], "b's own limit is 1"


def test_anonymous_clients_are_limited_by_address(ollama_server: OllamaServer, tmp_path: Path) -> None:
    models: list[dict[str, object]] = [{"name": ollama_server.model, "url": ollama_server.base_url}]
    with running_router(tmp_path, models, rate_limit_requests_per_minute="2") as router:
        # Any key is ignored while auth is off: the budget belongs to the client address.
        assert [ask(router, key).status_code for key in ("k1", "k2", "k3")] == [200, 200, 429]


def project_secret(volume: Path, revision: str, entries: list[dict[str, object]] | str) -> Path:
    """Write keys.yaml into `volume` as the kubelet updates a mounted Secret: the new content in a
    fresh timestamped directory, then the `..data` symlink swapped to it in one rename."""
    version = volume / f"..{revision}"
    version.mkdir()
    text = entries if isinstance(entries, str) else yaml.safe_dump({"keys": entries})
    (version / "keys.yaml").write_text(text)
    swap = volume / "..data_tmp"
    swap.symlink_to(version.name)
    swap.replace(volume / "..data")
    visible = volume / "keys.yaml"
    if not visible.is_symlink():
        visible.symlink_to("..data/keys.yaml")
    return visible


def test_the_keys_file_is_reloaded_when_the_mounted_secret_changes(ollama_server: OllamaServer, tmp_path: Path) -> None:
    volume = tmp_path / "api-keys"
    volume.mkdir()
    keys_file = project_secret(volume, "2026_01_01_00_00_00.1", [hashed_key("old", "key-old")])
    models: list[dict[str, object]] = [{"name": ollama_server.model, "url": ollama_server.base_url}]

    def statuses(router: RouterServer) -> tuple[int, int]:
        listed = [
            httpx.get(f"{router.openai_base_url}/models", headers={"authorization": f"Bearer {key}"}, timeout=10)
            for key in ("key-old", "key-new")
        ]
        return listed[0].status_code, listed[1].status_code

    with running_router(tmp_path / "router", models, auth_required="true", api_keys_file=str(keys_file)) as router:
        assert statuses(router) == (200, 401)
        # The key is rotated: the new one is admitted and the old one refused, without a restart.
        project_secret(volume, "2026_01_01_00_01_00.2", [hashed_key("new", "key-new")])
        wait_until(lambda: statuses(router) == (401, 200), timeout=60, interval=0.5)
        # A broken update keeps the keys that work rather than locking every client out.
        project_secret(volume, "2026_01_01_00_02_00.3", "keys: [{name: broken")
        # (the router reads the file again on a request, at most every few seconds)
        wait_until(lambda: statuses(router) == (401, 200) and "cannot reload the API key file"
                   in router.process.log_path.read_text(), timeout=60, interval=0.5)  # fmt: skip
        assert statuses(router) == (401, 200)
        assert router.process.process.poll() is None
