"""Reading Ollama's request log with the container runtime's timestamps (tests/support/gin.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.support.gin import engine_requests, go_duration_seconds

pytestmark = pytest.mark.unit

LOG = """\
2026-12-07T02:53:10.000000001Z time=2026-12-07T02:53:10Z level=INFO msg="llama runner started"
2026-12-07T02:53:12.500000000Z [GIN] 2026/12/07 - 02:53:12 | 200 |  1.25s |      10.244.0.5 | POST     "/api/generate"
2026-12-07T02:53:12.600000000Z [GIN] 2026/12/07 - 02:53:12 | 200 |     120µs |      10.244.0.9 | GET      "/api/version"
2026-12-07T02:53:14.123456789Z [GIN] 2026/12/07 - 02:53:14 | 500 | 2m3.5s |      10.244.0.7 | POST     "/api/chat"
"""


def test_generation_requests_are_dated_from_their_end_and_latency() -> None:
    warm, chat = engine_requests(LOG)
    assert (warm.address, warm.path, warm.status) == ("10.244.0.5", "/api/generate", 200)
    assert warm.ended == datetime(2026, 12, 7, 2, 53, 12, 500000, tzinfo=UTC)
    assert warm.started == warm.ended - timedelta(seconds=1.25)
    assert (chat.address, chat.path, chat.status) == ("10.244.0.7", "/api/chat", 500)
    assert chat.ended == datetime(2026, 12, 7, 2, 53, 14, 123456, tzinfo=UTC)
    assert chat.started == chat.ended - timedelta(seconds=123.5)


@pytest.mark.parametrize(
    ("text", "seconds"), [("126.5µs", 126.5e-6), ("13.4s", 13.4), ("4m9s", 249.0), ("1h2m3.5s", 3723.5), ("2ms", 0.002)]
)
def test_go_durations(text: str, seconds: float) -> None:
    assert go_duration_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "12", "1.2x", "s"])
def test_what_is_not_a_go_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a Go duration"):
        go_duration_seconds(text)
