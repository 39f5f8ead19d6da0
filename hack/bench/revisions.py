"""The router at two revisions, side by side in one run: `python -m hack.bench.revisions BEFORE [AFTER]`.

BEFORE and AFTER are git revisions (AFTER defaults to the working tree). Each one's `server/` tree
is run in turn, pinned as the peers are (the router on CPU 1; the upstream, the load generator and
this harness on CPU 0), alternating for `--rounds` rounds; the table gives each figure's median.
Per round and revision:

- CPU ms per request and req/s, 32 clients in a closed loop;
- added p50 and p99 at 100 and 500 req/s in an open loop, each against a direct run just before;
- 1,000 streams at once (20 chunks, 50 ms apart): TTFT added at p50 and CPU ms per stream.

docs/benchmarks.md ("A faster router") has a run. Only loopback addresses are used, and every
process started here is stopped (by process group) when the run ends or is interrupted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from hack.bench.harness import CHAT, REPO, Result, build_go_tools, loadgen, log, router, upstream
from hack.bench.peers import CpuMeter, pinned_here, pinning
from hack.bench.run import stop_on_sigterm

FIGURES = {
    "cpu_ms_per_request": "CPU ms / request, 32 clients",
    "rps": "req/s, 32 clients",
    "added_p50_100": "added p50 ms, 100 req/s",
    "added_p99_100": "added p99 ms, 100 req/s",
    "added_p50_500": "added p50 ms, 500 req/s",
    "added_p99_500": "added p99 ms, 500 req/s",
    "stream_ttft_added_p50": "TTFT added p50 ms, 1,000 streams",
    "stream_cpu_ms": "CPU ms / stream, 1,000 streams",
    "failed_streams": "failed streams",
}


def checkout(revision: str, into: Path) -> Path:
    """`revision`'s server/ tree under `into` (the working tree's for "WORKTREE")."""
    if revision == "WORKTREE":
        return REPO / "server"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "server"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "server"


def one_round(work: Path, source: Path, direct_base: str, cpus: tuple[str, str] | None) -> Result:
    system, driver = cpus if cpus else (None, None)

    def run(url: str, *args: str, body: Result | None = None) -> Result:
        return loadgen(url, *args, "-timeout", "30s", body=body, cpus=driver)

    with router(work, direct_base, cache_size="0", cpus=system, source=source) as (base, process):
        meter = CpuMeter(process.popen.pid, int(system) if system else None)
        chat, direct = f"{base}/v1/chat/completions", f"{direct_base}/v1/chat/completions"
        run(chat, "-concurrency", "4", "-duration", "2s")
        closed, cpu = meter.around(lambda: run(chat, "-concurrency", "32", "-duration", "6s"))
        row: Result = {"cpu_ms_per_request": 1000 * cpu.system / closed["requests"], "rps": closed["rps"]}
        for rate in (100, 500):
            args = ("-rate", str(rate), "-duration", "8s")
            baseline, routed = run(direct, *args), run(chat, *args)
            for q in ("p50", "p99"):
                row[f"added_{q}_{rate}"] = routed["latency_ms"][q] - baseline["latency_ms"][q]
        streams, body = ("-mode", "stream", "-streams", "1000"), {**CHAT, "stream": True}
        baseline = run(direct, *streams, body=body)
        routed, cpu = meter.around(lambda: run(chat, *streams, body=body))
        row["stream_ttft_added_p50"] = routed["ttft_ms"]["p50"] - baseline["ttft_ms"]["p50"]
        row["stream_cpu_ms"] = 1000 * cpu.system / max(1, routed["requests"])
        row["failed_streams"] = routed["errors"]
    return row


def table(revisions: list[str], rows: dict[str, list[Result]]) -> str:
    lines = ["| median of each round | " + " | ".join(revisions) + " |", "|---|" + "---|" * len(revisions)]
    for key, label in FIGURES.items():
        values = [f"{statistics.median(row[key] for row in rows[revision]):,.3g}" for revision in revisions]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after", nargs="?", default="WORKTREE")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    stop_on_sigterm()
    build_go_tools()
    cpus = pinning(os.sched_getaffinity(0))
    revisions = [args.before, args.after]
    rows: dict[str, list[Result]] = {revision: [] for revision in revisions}
    with tempfile.TemporaryDirectory(prefix="modelfleet-revisions-") as tmp:
        work = Path(tmp)
        sources = {revision: checkout(revision, Path(tempfile.mkdtemp(dir=tmp))) for revision in revisions}
        with pinned_here(cpus[1] if cpus else None), upstream(work, cpus=cpus[1] if cpus else None) as direct_base:
            for number in range(args.rounds):
                for revision in revisions:
                    rows[revision].append(one_round(work, sources[revision], direct_base, cpus))
                    log(f"revisions: round {number + 1} {revision}: {rows[revision][-1]}")
    print(table(revisions, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
