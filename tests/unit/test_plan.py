"""hack/plan.py: what a run will do, said up front."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hack import build_tools, plan

pytestmark = pytest.mark.unit


def test_a_machine_with_everything_gets_one_line() -> None:
    steps = [plan.Step("Go-built tools", "all 17 built", 0), plan.Step("cluster", "every run", 120)]
    assert plan.report("demo", steps, 2) == (
        "make demo: everything is installed and built; the cluster, the chart and the model take about 2m00s"
    )
    only_venv = [plan.Step("venv", "present", 0)]
    assert plan.report("install", only_venv, 2) == "make install: everything is installed and built"


def test_a_first_run_names_what_is_left_and_the_total() -> None:
    steps = [
        plan.Step("Python venv (.venv)", "present", 0),
        plan.Step("Go-built tools", "17 of 17 to build from source", 1500),
        plan.Step("cluster", "every run", 120),
    ]
    lines = plan.report("demo", steps, 2).splitlines()
    assert lines[0].startswith("make demo on this machine (2 cores)")
    assert lines[1].split()[-1] == "present"
    assert lines[2].endswith("17 of 17 to build from source                        about 25m00s")
    assert lines[3].endswith("about 2m00s")
    assert lines[4].split()[:2] == ["in", "all"]
    assert lines[4].endswith("about 27m00s")
    assert "builds Kubernetes, Helm, Prometheus and Ollama from source" in lines[5]
    assert lines[6] == f"  A second `make demo` takes about {build_tools.minutes(plan.WARM_DEMO_SECONDS)}."


def test_tools_missing_from_an_empty_cache_are_all_estimated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_TOOLS_CACHE", str(tmp_path))
    demo = list(build_tools.DEMO_TOOLS)
    step = plan.tools_step(demo)
    assert step.state == f"{len(demo)} of {len(demo)} to build from source"
    cores = os.cpu_count() or 1
    serial = sum(build_tools.expected_seconds(name, {}, cores) for name in demo)
    # Two at a time (the default), the wall time is shorter than the sum of the tools' times.
    assert step.seconds == pytest.approx(serial / build_tools.PARALLEL_SPEEDUP)
    monkeypatch.setenv("MODELFLEET_BUILD_JOBS", "1")
    assert plan.tools_step(demo).seconds == pytest.approx(serial)
    monkeypatch.delenv("MODELFLEET_BUILD_JOBS")
    # The demo's plan leaves out what only the tests build.
    catalog = build_tools.tool_catalog(build_tools.read_versions())
    every = [name for name in catalog if name not in build_tools.OPTIONAL_TOOLS]
    assert step.seconds < plan.tools_step(every).seconds


def test_base_images_count_as_cached_only_when_all_four_archives_are_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELFLEET_IMAGES_CACHE", str(tmp_path))
    for name in ("rootfs-bookworm-x.tar.gz", "docker.io_library_python_3.11-a.tar", "docker.io_library_redis_7-b.tar"):
        (tmp_path / name).write_bytes(b"")
    assert plan.base_images_step().seconds == plan.STEP_SECONDS["base-images"]
    (tmp_path / "docker.io_ollama_ollama_0.17.4-c.tar").write_bytes(b"")
    assert plan.base_images_step() == plan.Step("stand-in base images", "cached", 0)
