"""Pure parts of hack/demo_load.py: the env file, the metric's quantities, the phases and the live view."""

from __future__ import annotations

import io

import pytest

from hack import demo_load
from hack.demo_load import Phase, Progress, Sample, View

pytestmark = pytest.mark.unit


def sample(t: float, desired: int | None, ready: int, replicas: int | None = None, **counts: int) -> Sample:
    return Sample(t=t, queue=0, desired=desired, replicas=desired if replicas is None else replicas, ready=ready,
                  **counts)  # fmt: skip


def test_parse_env_reads_what_demo_sh_writes() -> None:
    text = "ROUTER_URL=http://10.244.0.1:30611\nAPI_KEY=a=b\n# a comment\n\nMODEL=gemma\n"
    assert demo_load.parse_env(text) == {"ROUTER_URL": "http://10.244.0.1:30611", "API_KEY": "a=b", "MODEL": "gemma"}


@pytest.mark.parametrize(("text", "value"), [("4", 4.0), ("1500m", 1.5), ("0", 0.0), ("250m", 0.25)])
def test_quantity(text: str, value: float) -> None:
    assert demo_load.quantity(text) == value


def test_answer_rate_counts_the_window_only() -> None:
    ended = [1.0, 5.0, 9.5, 10.0, 10.5]
    assert demo_load.answer_rate(ended, now=10.0, window=10.0) == pytest.approx(0.4)  # 1.0 is out, 10.5 not yet
    assert demo_load.answer_rate([], now=10.0) == 0.0


def test_a_run_goes_load_drain_done_and_measures_each_step() -> None:
    progress = Progress(timeout=480)
    assert progress.advance(sample(0, 1, 1)) is Phase.LOAD
    assert progress.advance(sample(1, 1, 1, in_flight=6)) is Phase.LOAD
    assert progress.advance(sample(3, 2, 1, in_flight=6)) is Phase.LOAD
    assert progress.advance(sample(4, 2, 1, in_flight=6)) is Phase.LOAD
    assert progress.advance(sample(17, 2, 2, in_flight=6)) is Phase.DRAIN
    # The HPA wants 1 but the Deployment still has 2, then the last requests are still running.
    assert progress.advance(sample(60, 1, 2, replicas=2)) is Phase.DRAIN
    assert progress.advance(sample(61, 1, 1, in_flight=1)) is Phase.DRAIN
    assert progress.advance(sample(63, 1, 1)) is Phase.DONE
    assert (progress.load_started, progress.decided_up, progress.scaled_up, progress.back_to_one) == (0, 3, 17, 63)
    assert progress.figures() == [
        "load to the HPA's decision for 2 replicas: 3.0 s",
        "load to 2 Ready replicas:                  17.0 s",
        "load stopped to back at 1 replica:         46.0 s",
    ]


def test_a_model_left_at_two_is_waited_for_before_the_load() -> None:
    progress = Progress(timeout=480)
    assert progress.advance(sample(0, 2, 2)) is Phase.SETTLE
    assert progress.advance(sample(30, 1, 2, replicas=2)) is Phase.SETTLE
    assert progress.advance(sample(45, 1, 1)) is Phase.LOAD
    assert progress.load_started == 45


def test_the_bound_fails_the_run_and_says_where_it_was() -> None:
    progress = Progress(timeout=480)
    progress.advance(sample(0, 1, 1))
    assert progress.advance(sample(479, 2, 1)) is Phase.LOAD
    assert progress.advance(sample(480, 2, 1)) is Phase.FAILED
    assert progress.reason == f"still {Phase.LOAD.value!r} after 480 s"
    assert progress.figures()[1].endswith(" -")
    assert progress.advance(sample(481, 2, 2)) is Phase.FAILED  # a failed run stays failed


def test_a_load_that_ran_out_of_requests_before_two_replicas_fails() -> None:
    progress = Progress(timeout=480)
    progress.advance(sample(0, 1, 1))
    assert progress.advance(sample(50, 1, 1), load_exhausted=True) is Phase.FAILED
    assert "before a 2nd replica" in progress.reason


def test_a_missing_hpa_reading_is_not_one_replica() -> None:
    progress = Progress(timeout=480)
    assert progress.advance(sample(0, None, 1, replicas=1)) is Phase.SETTLE


def test_view_lines_and_plain_line() -> None:
    seen = Sample(t=12.3, queue=4, desired=2, replicas=1, ready=1, in_flight=6, answered=3, failed=1, rate=0.25)
    assert demo_load.view_lines(seen, Phase.LOAD) == [
        f"[   12 s] {Phase.LOAD.value}",
        "  queue depth    4 (what the HPA reads)   replicas: desired 2, ready 1",
        "  requests  0.2/s   in flight 6   answered 3   failed 1",
    ]
    assert demo_load.plain_line(seen, Phase.DRAIN) == (
        "t=12s phase=drain queue=4 desired=2 ready=1 rate=0.2/s in_flight=6 answered=3 failed=1"
    )
    unknown = Sample(t=0, queue=None, desired=None, replicas=None, ready=0)
    assert "queue=- desired=- ready=0" in demo_load.plain_line(unknown, Phase.SETTLE)


def test_redraw_moves_up_over_the_lines_it_drew_and_clears_each() -> None:
    assert demo_load.redraw(["a", "b"], 0) == "a\x1b[K\nb\x1b[K\n"
    assert demo_load.redraw(["c", "d"], 2) == "\x1b[2Fc\x1b[K\nd\x1b[K\n"


def test_view_on_a_terminal_rewrites_its_lines_and_keeps_notes() -> None:
    out = io.StringIO()
    view = View(out, tty=True)
    view.show(sample(0, 1, 1), Phase.LOAD)
    view.show(sample(1, 1, 1), Phase.LOAD)
    view.note("stop")
    view.show(sample(2, 2, 2), Phase.DRAIN)
    text = out.getvalue()
    assert text.count("\x1b[3F") == 2  # the second show and the note go back over the three lines
    assert "\x1b[3Fstop\x1b[K\n[    2 s]" in text  # the note stays; the view starts again below it
    view.close()
    view.note("done")
    assert out.getvalue().endswith("failed 0\x1b[K\ndone\x1b[K\n")  # the last view stays above what follows


def test_view_off_a_terminal_prints_plain_lines() -> None:
    out = io.StringIO()
    view = View(out, tty=False)
    view.note("start")
    view.show(sample(0, 1, 1), Phase.LOAD)
    view.show(sample(1, 1, 1), Phase.LOAD)
    assert "\x1b" not in out.getvalue()
    assert out.getvalue().splitlines()[0] == "start"
    assert len(out.getvalue().splitlines()) == 3
