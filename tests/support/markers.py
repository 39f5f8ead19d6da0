"""A pytest plugin: every test is exactly one kind (unit, integration or e2e), lives in that kind's folder,
and `--fail-on-deselected` turns a marker expression that left a test out into a failed run.

`make test` selects each kind with `-m`; without this, a test that lacks its marker is deselected and the
run still passes, so the test silently never runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DESELECTED_ITEMS = pytest.StashKey[list[str]]()
KIND_COUNTS = pytest.StashKey[dict[str, int]]()

# Every test is exactly one of these, and lives in the folder of that name: `make test` selects each kind
# by its marker, so a test without one (or with the wrong one) would be deselected and never run.
TEST_KINDS = ("unit", "integration", "e2e")
TESTS_ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fail-on-deselected",
        action="store_true",
        help="exit non-zero if the marker expression deselected any collected test (make test sets it)",
    )


def kind_problem(item: pytest.Item) -> str | None:
    """Why `item` would not run under `make test`'s selection, or None if it will."""
    kinds = [kind for kind in TEST_KINDS if item.get_closest_marker(kind) is not None]
    if len(kinds) != 1:
        found = ", ".join(kinds) or "none"
        return f"carries {found}; it needs exactly one of the markers {', '.join(TEST_KINDS)}"
    try:
        folder = item.path.resolve().relative_to(TESTS_ROOT).parts[0]
    except ValueError:
        return None
    if folder in TEST_KINDS and folder != kinds[0]:
        return f"is marked {kinds[0]} but lives in tests/{folder}, which `make test` selects with -m {folder}"
    return None


def refuse_tests_without_their_kind(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse the collection when a test lacks its kind, before `-m` can quietly deselect it."""
    problems = [f"  {item.nodeid} {problem}" for item in items if (problem := kind_problem(item))]
    if problems:
        raise pytest.UsageError("tests that `make test` would never run:\n" + "\n".join(problems))
    config.stash[DESELECTED_ITEMS] = []
    config.stash[KIND_COUNTS] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    refuse_tests_without_their_kind(config, items)


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        items[0].config.stash.setdefault(DESELECTED_ITEMS, []).extend(item.nodeid for item in items)


def pytest_collection_finish(session: pytest.Session) -> None:
    counts = session.config.stash.setdefault(KIND_COUNTS, {})
    for item in session.items:
        for kind in TEST_KINDS:
            if item.get_closest_marker(kind) is not None:
                counts[kind] = counts.get(kind, 0) + 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    deselected = session.config.stash.get(DESELECTED_ITEMS, [])
    if deselected and session.config.getoption("--fail-on-deselected"):
        session.exitstatus = pytest.ExitCode.USAGE_ERROR
