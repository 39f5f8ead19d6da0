"""Draw the autoscaling e2e test's timeline (.cache/autoscaling/timeline.json) as a PNG.

    make autoscaling-plot      (installs matplotlib into the venv first: pip install -e '.[plot]')
    python -m hack.plot_autoscaling [TIMELINE_JSON] [PNG]

Three panels on one time axis: the queue depth summed over the routers (what the HPA reads) and the
requests holding a slot; the HPA's desired replicas, the Deployment's replicas and its Ready ones;
and every request's time to first token, by when it started. The test's marks are vertical lines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TIMELINE = REPO / ".cache" / "autoscaling" / "timeline.json"
DEFAULT_PNG = REPO / "docs" / "autoscaling-timeline.png"


def series(samples: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(s["t"], s[key]) for s in samples if s.get(key) is not None]
    return [t for t, _ in points], [float(v) for _, v in points]


def plot(timeline: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = timeline["samples"]
    figure, (queue_ax, replicas_ax, latency_ax) = plt.subplots(3, 1, sharex=True, figsize=(14, 9))
    queue_ax.step(*series(samples, "queue"), where="post", label="queue depth (sum over routers)", color="tab:red")
    queue_ax.step(*series(samples, "in_flight"), where="post", label="requests holding a slot", color="tab:gray")
    queue_ax.set_ylabel("requests")
    replicas_ax.step(*series(samples, "replicas"), where="post", label="Deployment replicas", color="tab:blue",
                     linewidth=2.5, alpha=0.6)  # fmt: skip
    replicas_ax.step(*series(samples, "ready"), where="post", label="Ready replicas", color="tab:green")
    replicas_ax.step(*series(samples, "desired"), where="post", label="HPA desired replicas", color="tab:purple",
                     linestyle="--")  # fmt: skip
    replicas_ax.set_ylabel("replicas")
    replicas_ax.yaxis.get_major_locator().set_params(integer=True)
    queue_ax.yaxis.get_major_locator().set_params(integer=True)
    answered = [r for r in timeline["requests"] if r.get("first_token") is not None]
    latency_ax.scatter(
        [r["started"] for r in answered],
        [r["first_token"] - r["started"] for r in answered],
        s=8,
        label="time to first token, by start",
        color="tab:orange",
    )
    failed = [r for r in timeline["requests"] if r.get("error")]
    if failed:
        latency_ax.scatter([r["started"] for r in failed], [0] * len(failed), marker="x", color="black",
                           label="failed request")  # fmt: skip
    latency_ax.set_ylabel("seconds")
    latency_ax.set_xlabel("seconds since the test module started")
    for ax in (queue_ax, replicas_ax, latency_ax):
        for moment, _label in timeline["marks"]:
            ax.axvline(moment, color="lightgray", linewidth=0.8, zorder=0)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    top = queue_ax.get_ylim()[1]
    for moment, label in timeline["marks"]:
        queue_ax.text(moment, top, f" {label}", rotation=90, va="top", fontsize=6, color="dimgray")
    figure.suptitle("ModelFleet: queue-depth autoscaling of a real Ollama model (1 -> 2 -> 1, then 0 -> 1 -> 0)")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else DEFAULT_TIMELINE
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_PNG
    if not source.is_file():
        print(f"no timeline at {source}: run the autoscaling e2e test first (pytest -m autoscaling tests/e2e)")
        return 1
    plot(json.loads(source.read_text()), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
