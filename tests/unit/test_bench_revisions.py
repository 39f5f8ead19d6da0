"""hack.bench.revisions: which trees it runs, and its table of medians."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hack.bench import revisions
from hack.bench.harness import REPO

pytestmark = pytest.mark.unit


def row(cpu: float, ttft: float) -> dict[str, float]:
    return {key: 0.0 for key in revisions.FIGURES} | {"cpu_ms_per_request": cpu, "stream_ttft_added_p50": ttft}


def test_the_table_gives_each_figures_median_per_revision() -> None:
    rows = {"abc": [row(0.9, 900), row(0.6, 950), row(0.7, 1000)], "WORKTREE": [row(0.3, 400), row(0.4, 300)]}
    text = revisions.table(["abc", "WORKTREE"], rows)
    assert "| median of each round | abc | WORKTREE |" in text
    assert "| CPU ms / request, 32 clients | 0.7 | 0.35 |" in text
    assert "| TTFT added p50 ms, 1,000 streams | 950 | 350 |" in text


def test_a_revision_is_its_own_server_tree_and_the_worktree_is_this_one(tmp_path: Path) -> None:
    assert revisions.checkout("WORKTREE", tmp_path) == REPO / "server"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    tree = revisions.checkout(head.stdout.strip(), tmp_path)
    assert tree == tmp_path / "server"
    committed = ["git", "-C", str(REPO), "show", "HEAD:server/modelfleet/server/app.py"]
    expected = subprocess.run(committed, capture_output=True, text=True, check=True).stdout
    assert (tree / "modelfleet" / "server" / "app.py").read_text() == expected
