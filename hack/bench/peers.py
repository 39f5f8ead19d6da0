"""`make bench` peers side by side: the ModelFleet router, LiteLLM's proxy and vllm-router in one run.

Each system runs alone, pinned to CPU 1, in front of the same fake upstream (hack/bench/upstream);
the upstream, the load generator (hack/bench/loadgen) and this harness run on CPU 0. For each
system, one after another:

- open loop at fixed rates: the latency it adds to the upstream's, against a direct run at the
  same rate just before it. A rate is "overloaded" when more than 1 % of its requests failed or
  fewer than 90 % of the requests it was sent per second were answered per second; the higher
  rates are then not run (they would be too, and a backlog only delays what follows);
- closed loop (32 clients): its throughput, the CPU time of its process tree per request and the
  requests it serves per second of CPU (per core);
- streams (1,000 at once, 20 chunks 50 ms apart): the time to the first chunk and the gap between
  chunks it adds, failures, the CPU time per stream and the peak RSS.

ModelFleet runs twice: with its cache off, then on (the same request again and again, at
temperature 0: every answer after the first is a hit).

`bench-results.json` gets `peers`, one row per system (req/s per core and CPU per request at 32
clients, added p50 and p99 by rate, stream TTFT added and CPU per stream: `summary`), and
`peers_run`, everything measured.

The peers live in venvs of their own (`make install-bench-peers`); a peer whose venv is missing is
not measured, and the results and the table say so and how to install it.

Before each measured run the harness waits (at most a minute) until the system's processes are idle:
a system that does not stop work for a client that gave up would otherwise bill one run's backlog
to the next. Each run also records how much of the system's CPU other processes used meanwhile
(`others_cores`): on a shared machine, that is the noise.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import ipaddress
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import yaml

from hack.bench.harness import (
    CHAT,
    LOOPBACK,
    REPO,
    Process,
    ProcStat,
    Result,
    free_port,
    loadgen,
    log,
    median_of,
    parse_proc_stat,
    router,
    running,
    upstream,
)

MODELFLEET = "modelfleet"
MODELFLEET_CACHED = "modelfleet (cache on)"
INSTALL_HINT = "make install-bench-peers"
# The rule for a rate the system did not keep up with.
MAX_ERROR_RATE = 0.01
MIN_ACHIEVED_FRACTION = 0.9
# Closed-loop CPU use (cores) from which the system's one core counts as saturated.
SATURATED_CORES = 0.9
REQUEST_TIMEOUT = "10s"  # loadgen's deadline per request: an overloaded run still ends soon after its duration
IDLE_CORES = 0.05  # a system using less than this much CPU over IDLE_WINDOW seconds is idle
IDLE_WINDOW = 0.3
IDLE_TIMEOUT = 60.0
FIRST_ERRORS = 3


@dataclass(frozen=True)
class Peer:
    name: str
    venv: str  # relative to the repository
    executable: str
    distribution: str  # whose version is reported
    requirements: str

    def path(self, repo: Path = REPO) -> Path:
        return repo / self.venv / "bin" / self.executable

    def python(self, repo: Path = REPO) -> Path:
        return repo / self.venv / "bin" / "python"


LITELLM = Peer("litellm", ".venv-litellm-proxy", "litellm", "litellm", "hack/bench/requirements-litellm-proxy.txt")
VLLM_ROUTER = Peer("vllm-router", ".venv-vllm-router", "vllm-router", "vllm-router",
                   "hack/bench/requirements-vllm-router.txt")  # fmt: skip
PEERS = (LITELLM, VLLM_ROUTER)


@dataclass(frozen=True)
class Plan:
    rates: tuple[int, ...]
    seconds: float  # per open-loop rate and for the closed loop
    concurrency: int  # closed loop
    streams: int  # at once, per streaming round
    stream_rounds: int
    warmup_seconds: float


# The low rates leave one at which LiteLLM's proxy, much the slowest of the three on one core, keeps up.
RATES = (20, 50, 100, 300, 500)


def plan(quick: bool) -> Plan:
    if quick:
        return Plan(rates=RATES, seconds=2, concurrency=32, streams=200, stream_rounds=1, warmup_seconds=1)
    return Plan(rates=RATES, seconds=10, concurrency=32, streams=1000, stream_rounds=2, warmup_seconds=3)


# Pure parts ------------------------------------------------------------------------------------


def pinning(available: set[int]) -> tuple[str, str] | None:
    """(CPUs of the system under test, CPUs of the upstream, load generator and harness), or None
    when this process may not use both CPU 0 and CPU 1 (then nothing is pinned)."""
    return ("1", "0") if {0, 1} <= available else None


def litellm_config(upstream_url: str, model: str = "bench") -> str:
    """LiteLLM proxy's config.yaml: one OpenAI-compatible model at the upstream, no database, no cache,
    no callbacks. Like the router in this benchmark (auth off), it checks no key; it refuses to start
    without a master key unless told that this is meant."""
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {"model": f"openai/{model}", "api_base": f"{upstream_url}/v1", "api_key": "none"},
            }
        ],
        "litellm_settings": {"set_verbose": False},
        "general_settings": {"dangerously_permit_weak_or_unset_master_key": True},
    }
    return yaml.safe_dump(config, sort_keys=False)


def litellm_argv(executable: Path, config: Path, port: int) -> list[str]:
    return [str(executable), "--config", str(config), "--host", LOOPBACK, "--port", str(port), "--num_workers", "1"]


def litellm_env(home: Path) -> dict[str, str]:
    """Nothing inherited but PATH: no key, no DATABASE_URL; the bundled model cost map (no fetch at start)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
    }


def vllm_router_argv(executable: Path, upstream_url: str, port: int, metrics_port: int) -> list[str]:
    """One worker, round robin (its default, cache_aware, keeps a prefix tree per request). Its metrics
    listener defaults to a fixed port: given a free loopback one."""
    return [
        str(executable), "--host", LOOPBACK, "--port", str(port), "--worker-urls", upstream_url,
        "--policy", "round_robin", "--prometheus-host", LOOPBACK, "--prometheus-port", str(metrics_port),
        "--log-level", "warning",
    ]  # fmt: skip


def process_tree(root: int, stats: Mapping[int, ProcStat]) -> list[int]:
    """`root` and its descendants among `stats` (empty when `root` is gone)."""
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in tree:
            tree.append(pid)
            todo += children.get(pid, [])
    return tree


def tree_cpu_seconds(root: int, stats: Mapping[int, ProcStat], ticks_per_second: int) -> float:
    """CPU time of `root` and every descendant alive in `stats`, each with its reaped children's."""
    ticks = sum(
        stats[pid].user_ticks + stats[pid].system_ticks + stats[pid].children_user_ticks
        + stats[pid].children_system_ticks
        for pid in process_tree(root, stats)
    )  # fmt: skip
    return ticks / ticks_per_second


def cpu_busy_ticks(proc_stat: str, cpu: int) -> int:
    """Ticks CPU `cpu` spent busy (user, nice, system, irq, softirq) from /proc/stat's text."""
    for line in proc_stat.splitlines():
        fields = line.split()
        if fields and fields[0] == f"cpu{cpu}":
            user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[1:8])
            return user + nice + system + irq + softirq
    raise ValueError(f"no cpu{cpu} line in /proc/stat")


def overloaded(rate: float, requests: int, errors: int, achieved_rps: float) -> bool:
    """More than 1 % of the answers were errors, or under 90 % of the rate sent was answered."""
    error_rate = errors / (requests + errors) if requests + errors else 1.0
    return error_rate > MAX_ERROR_RATE or achieved_rps < MIN_ACHIEVED_FRACTION * rate


@dataclass(frozen=True)
class Cpu:
    """CPU seconds used during a run: by the system's process tree, and by anything else on its CPU."""

    system: float
    others: float = 0.0


def open_loop_entry(rate: int, direct: Result, routed: Result, cpu: Cpu) -> Result:
    """One rate: the system's latency quantiles less the direct run's, its errors and CPU per request.
    Quantiles are None when no request succeeded."""
    requests, answered = routed["requests"], routed["requests"] + routed["errors"]
    entry: Result = {
        "rate": rate,
        "achieved_rps": round(routed["rps"], 1),
        "requests": requests,
        "errors": routed["errors"],
        "error_rate": round(routed["errors"] / answered, 4) if answered else 1.0,
        "overloaded": overloaded(rate, requests, routed["errors"], routed["rps"]),
        "cpu_ms_per_request": round(1000 * cpu.system / requests, 3) if requests else None,
        "others_cores": round(cpu.others / routed["duration_s"], 3),
        "loadgen_cpu_percent": round(routed["loadgen_cpu_percent_of_one_core"], 1),
    }
    for q in ("p50", "p90", "p99"):
        entry[f"direct_{q}_ms"] = direct["latency_ms"][q]
        entry[f"{q}_ms"] = routed["latency_ms"][q] if requests else None
        entry[f"added_{q}_ms"] = round(routed["latency_ms"][q] - direct["latency_ms"][q], 3) if requests else None
    if routed.get("first_errors"):
        entry["first_errors"] = routed["first_errors"][:FIRST_ERRORS]
    return entry


def not_run_entry(rate: int, below: int) -> Result:
    """A rate above one at which the system was already overloaded."""
    return {"rate": rate, "overloaded": True, "not_run": f"overloaded at {below} req/s already"}


def closed_loop_entry(routed: Result, cpu: Cpu) -> Result:
    """Throughput flat out, and what it cost: CPU per request, requests per CPU second (per core)."""
    requests = routed["requests"]
    cores = cpu.system / routed["duration_s"]
    entry: Result = {
        "rps": round(routed["rps"], 1),
        "errors": routed["errors"],
        "p50_ms": routed["latency_ms"]["p50"] if requests else None,
        "p99_ms": routed["latency_ms"]["p99"] if requests else None,
        "cpu_cores": round(cores, 3),
        "saturated": cores >= SATURATED_CORES,
        "others_cores": round(cpu.others / routed["duration_s"], 3),
        "rps_per_core": round(requests / cpu.system, 1) if cpu.system > 0 else None,
        "cpu_ms_per_request": round(1000 * cpu.system / requests, 3) if requests else None,
    }
    if routed.get("first_errors"):
        entry["first_errors"] = routed["first_errors"][:FIRST_ERRORS]
    return entry


def streaming_entry(direct: list[Result], routed: list[Result], cpu: Cpu, peak_rss_mb: float | None = None) -> Result:
    """Streams through the system against streams direct: TTFT and chunk gap added (medians of the
    rounds' quantiles), CPU per completed stream, and the peak RSS of the system's main process."""
    completed = sum(run["requests"] for run in routed)
    entry: Result = {
        "streams": completed + sum(run["errors"] for run in routed),
        "failed": sum(run["errors"] for run in routed),
        "cpu_ms_per_stream": round(1000 * cpu.system / completed, 3) if completed else None,
        "peak_rss_mb": None if peak_rss_mb is None else round(peak_rss_mb, 1),
    }
    succeeded = [run for run in routed if run["requests"]]
    for metric, name in (("ttft_ms", "ttft"), ("chunk_gap_ms", "gap")):
        for q in ("p50", "p99"):
            entry[f"direct_{name}_{q}_ms"] = median_of(direct, metric, q)
            entry[f"{name}_{q}_ms"] = median_of(succeeded, metric, q) if succeeded else None
            entry[f"{name}_added_{q}_ms"] = (
                round(entry[f"{name}_{q}_ms"] - entry[f"direct_{name}_{q}_ms"], 3) if succeeded else None
            )
    errors = [error for run in routed for error in run.get("first_errors") or []]
    if errors:
        entry["first_errors"] = errors[:FIRST_ERRORS]
    return entry


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ModelFleet's figure over the peer's, when both are positive (a latency added can be noise below 0)."""
    if ours is None or theirs is None or ours <= 0 or theirs <= 0:
        return None
    return round(ours / theirs, 3)


def ratios(systems: Mapping[str, Result]) -> Result:
    """For each peer: ModelFleet's figure divided by the peer's (below 1: ModelFleet spends or adds less).
    Added latency is compared only at rates where neither system was overloaded."""
    ours = systems[MODELFLEET]
    out: Result = {}
    for name, theirs in systems.items():
        if name in (MODELFLEET, MODELFLEET_CACHED):
            continue
        entry: Result = {
            "cpu_ms_per_request": ratio(ours["closed_loop"]["cpu_ms_per_request"],
                                        theirs["closed_loop"]["cpu_ms_per_request"]),
            "rps_per_core": ratio(ours["closed_loop"]["rps_per_core"], theirs["closed_loop"]["rps_per_core"]),
            "cpu_ms_per_stream": ratio(ours["streaming"]["cpu_ms_per_stream"],
                                       theirs["streaming"]["cpu_ms_per_stream"]),
            "ttft_added_p50_ms": ratio(ours["streaming"]["ttft_added_p50_ms"],
                                       theirs["streaming"]["ttft_added_p50_ms"]),
        }  # fmt: skip
        for rate, our_rate in ours["open_loop"].items():
            their_rate = theirs["open_loop"].get(rate)
            fair = their_rate is not None and not our_rate["overloaded"] and not their_rate["overloaded"]
            entry[f"added_p50_ms_at_{rate}"] = (
                ratio(our_rate["added_p50_ms"], their_rate["added_p50_ms"]) if fair and their_rate else None
            )
        out[name] = entry
    return out


SUMMARY_RATES = ("100", "300", "500")


def summary(run: Result) -> list[Result]:
    """`peers` in bench-results.json: one row per measured system, the figures compared across systems."""
    rows: list[Result] = []
    for name, system in run.get("systems", {}).items():
        closed, streams, open_loop = system["closed_loop"], system["streaming"], system["open_loop"]
        usable = {rate: entry for rate, entry in open_loop.items() if not entry.get("overloaded")}
        rows.append({
            "system": name,
            "version": run["versions"][name],
            "rps_per_core": closed["rps_per_core"],
            "cpu_ms_per_request": closed["cpu_ms_per_request"],
            "saturated": closed["saturated"],
            # None where the system was overloaded at that rate (or below it).
            "added_p50_ms": {rate: usable[rate]["added_p50_ms"] if rate in usable else None for rate in SUMMARY_RATES},
            "added_p99_ms": {rate: usable[rate]["added_p99_ms"] if rate in usable else None for rate in SUMMARY_RATES},
            "stream_added_ttft_p50_ms": streams["ttft_added_p50_ms"],
            "stream_cpu_ms_per_stream": streams["cpu_ms_per_stream"],
            "stream_added_gap_p50_ms": streams.get("gap_added_p50_ms"),
            "stream_added_gap_p99_ms": streams.get("gap_added_p99_ms"),
            "stream_failed": streams["failed"],
            "stream_peak_rss_mb": streams.get("peak_rss_mb"),
        })  # fmt: skip
    return rows


def number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def added(entry: Result, *quantiles: str) -> str:
    return " / ".join(number(entry.get(f"added_{q}_ms")) for q in quantiles)


def rows(result: Result) -> list[str]:
    """The markdown of a `peers` result."""
    if "systems" not in result:
        return [f"Peers side by side: not run. {result.get('reason', '')}"]
    systems: dict[str, Result] = result["systems"]
    pins = result.get("pinning")
    where = (
        f"each system alone on CPU {pins['system']}, upstream and load generator on CPU {pins['driver']}"
        if pins
        else "not pinned (CPUs 0 and 1 not both available)"
    )
    lines = [
        f"Peers side by side ({where}; " + ", ".join(f"{n} {result['versions'][n]}" for n in systems) + ")",
        "",
        "| open loop | rate req/s | answered req/s | errors | added p50 / p90 / p99 ms | CPU ms / request | |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, system in systems.items():
        for entry in system["open_loop"].values():
            if "not_run" in entry:
                lines.append(f"| {name} | {entry['rate']} | — | — | — | — | not run: {entry['not_run']} |")
                continue
            lines.append(
                f"| {name} | {entry['rate']} | {entry['achieved_rps']:,.0f} | {entry['error_rate']:.1%} "
                f"| {added(entry, 'p50', 'p90', 'p99')} | {number(entry['cpu_ms_per_request'], 3)} "
                f"| {'**overloaded**' if entry['overloaded'] else 'ok'} |"
            )
    lines += [
        "",
        f"| flat out and streaming | req/s ({result['plan']['concurrency']} clients) | CPU cores "
        "| req/s per core | CPU ms / request | others on its CPU (cores) | stream TTFT added p50 ms "
        "| chunk gap added p50 / p99 ms | CPU ms / stream | peak RSS MB | failed streams |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, system in systems.items():
        closed, streams = system["closed_loop"], system["streaming"]
        saturated = "" if closed["saturated"] else " (not saturated)"
        lines.append(
            f"| {name} | {closed['rps']:,.0f} | {closed['cpu_cores']:.2f}{saturated} "
            f"| {number(closed['rps_per_core'], 0)} | {number(closed['cpu_ms_per_request'], 3)} "
            f"| {closed['others_cores']:.2f} | {number(streams['ttft_added_p50_ms'])} "
            f"| {number(streams.get('gap_added_p50_ms'))} / {number(streams.get('gap_added_p99_ms'))} "
            f"| {number(streams['cpu_ms_per_stream'], 3)} | {number(streams.get('peak_rss_mb'), 0)} "
            f"| {streams['failed']} / {streams['streams']} |"
        )
    for peer, entry in result.get("ratios", {}).items():
        at = ", ".join(
            f"{key.rsplit('_', 1)[1]} req/s {number(value, 3)}"
            for key, value in entry.items()
            if key.startswith("added_p50_ms_at_")
        )
        lines.append(
            f"\nModelFleet / {peer}: CPU ms per request **{number(entry['cpu_ms_per_request'], 3)}**, "
            f"req/s per core {number(entry['rps_per_core'], 3)}, CPU ms per stream "
            f"{number(entry['cpu_ms_per_stream'], 3)}, stream TTFT added {number(entry['ttft_added_p50_ms'], 3)}; "
            f"added p50 at {at} (— : overloaded or not above 0)"
        )
    for name, why in result.get("skipped", {}).items():
        lines.append(f"\nNot measured: {name}: {why}")
    return lines


def parse_listeners(tcp_table: str, inodes: set[str]) -> list[tuple[str, int]]:
    """(address, port) of the listening sockets in a /proc/net/tcp or tcp6 table whose inode is in `inodes`."""
    found = []
    for line in tcp_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != "0A" or fields[9] not in inodes:  # 0A: TCP_LISTEN
            continue
        address, port = fields[1].split(":")
        raw = bytes.fromhex(address)
        # The kernel prints the address as 32-bit words in host (little-endian) order.
        packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
        found.append((str(ipaddress.ip_address(packed)), int(port, 16)))
    return found


# Processes -------------------------------------------------------------------------------------


def read_proc_stats() -> dict[int, ProcStat]:
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stats[int(entry.name)] = parse_proc_stat((entry / "stat").read_text())
    return stats


def process_tree_cpu(pid: int) -> float:
    return tree_cpu_seconds(pid, read_proc_stats(), os.sysconf("SC_CLK_TCK"))


@dataclass
class CpuMeter:
    """CPU time of a process tree, and of everything else on the CPU it is pinned to (if it is)."""

    pid: int
    cpu: int | None

    def sample(self) -> tuple[float, float]:
        busy = cpu_busy_ticks(Path("/proc/stat").read_text(), self.cpu) if self.cpu is not None else 0
        return process_tree_cpu(self.pid), busy / os.sysconf("SC_CLK_TCK")

    def around(self, run: Callable[[], Result]) -> tuple[Result, Cpu]:
        """What `run` returns, and the CPU time used while it ran."""
        system_before, busy_before = self.sample()
        result = run()
        system_after, busy_after = self.sample()
        system = system_after - system_before
        others = max(0.0, busy_after - busy_before - system) if self.cpu is not None else 0.0
        return result, Cpu(system, others)

    def wait_idle(self, name: str) -> None:
        """Until the tree uses under IDLE_CORES over IDLE_WINDOW seconds (at most IDLE_TIMEOUT)."""
        deadline = time.monotonic() + IDLE_TIMEOUT
        while time.monotonic() < deadline:
            before = process_tree_cpu(self.pid)
            time.sleep(IDLE_WINDOW)
            if process_tree_cpu(self.pid) - before < IDLE_CORES * IDLE_WINDOW:
                return
        log(f"peers: {name} still busy after {IDLE_TIMEOUT:.0f} s; measuring anyway")


def listeners(root: int) -> list[tuple[str, int]]:
    """Where `root` and its descendants listen (TCP, IPv4 and IPv6)."""
    inodes = set()
    for pid in process_tree(root, read_proc_stats()):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    return [
        found for table in ("tcp", "tcp6") for found in parse_listeners(Path(f"/proc/net/{table}").read_text(), inodes)
    ]


def check_loopback_only(name: str, pid: int) -> None:
    outside = [(host, port) for host, port in listeners(pid) if not ipaddress.ip_address(host).is_loopback]
    if outside:
        raise RuntimeError(f"{name} listens outside the loopback: {outside}")


def chat_ok(base: str) -> bool:
    request = urllib.request.Request(
        f"{base}/v1/chat/completions", data=json.dumps(CHAT).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return bool(response.status == 200)


def installed_version(peer: Peer) -> str:
    completed = subprocess.run(
        [str(peer.python()), "-c", f"import importlib.metadata as m; print(m.version({peer.distribution!r}))"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return completed.stdout.strip()


def modelfleet_version() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    suffix = f" ({commit.stdout.strip()})" if commit.returncode == 0 else ""
    return importlib.metadata.version("modelfleet") + suffix


@contextlib.contextmanager
def litellm_proxy(work: Path, upstream_url: str, cpus: str | None) -> Iterator[tuple[str, Process]]:
    port = free_port()
    config = work / "litellm-config.yaml"
    config.write_text(litellm_config(upstream_url))
    base = f"http://{LOOPBACK}:{port}"
    home = work / "litellm-home"
    home.mkdir(exist_ok=True)
    argv = litellm_argv(LITELLM.path(), config, port)
    with running("litellm-proxy", argv, work, lambda: chat_ok(base), env=litellm_env(home), timeout=180,
                 cpus=cpus) as process:  # fmt: skip
        yield base, process


@contextlib.contextmanager
def vllm_router(work: Path, upstream_url: str, cpus: str | None) -> Iterator[tuple[str, Process]]:
    port, metrics_port = free_port(), free_port()
    base = f"http://{LOOPBACK}:{port}"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work)}
    argv = vllm_router_argv(VLLM_ROUTER.path(), upstream_url, port, metrics_port)
    with running("vllm-router", argv, work, lambda: chat_ok(base), env=env, timeout=120, cpus=cpus) as process:
        yield base, process


@contextlib.contextmanager
def pinned_here(cpus: str | None) -> Iterator[None]:
    """This thread (and what it starts, unless told otherwise) on `cpus` while the block runs."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# Measurement -----------------------------------------------------------------------------------


def measure(name: str, base: str, meter: CpuMeter, direct_base: str, steps: Plan, driver: str | None,
            request: Result, peak_rss_mb: Callable[[], float]) -> Result:  # fmt: skip
    chat, direct_chat = f"{base}/v1/chat/completions", f"{direct_base}/v1/chat/completions"

    def run(url: str, *args: str, body: Result | None = None) -> Result:
        return loadgen(url, *args, "-timeout", REQUEST_TIMEOUT, body=body or request, cpus=driver)

    check_loopback_only(name, meter.pid)
    run(chat, "-concurrency", "4", "-duration", f"{steps.warmup_seconds}s")
    result: Result = {"open_loop": {}}
    overloaded_at = None
    for rate in steps.rates:
        if overloaded_at is not None:
            result["open_loop"][str(rate)] = not_run_entry(rate, overloaded_at)
            continue
        args = ("-rate", str(rate), "-duration", f"{steps.seconds}s")
        direct = run(direct_chat, *args)
        meter.wait_idle(name)
        routed, cpu = meter.around(partial(run, chat, *args))
        result["open_loop"][str(rate)] = entry = open_loop_entry(rate, direct, routed, cpu)
        log(f"peers {name} {rate} req/s: {entry}")
        if entry["overloaded"]:
            overloaded_at = rate
    meter.wait_idle(name)
    flat_out = ("-concurrency", str(steps.concurrency), "-duration", f"{steps.seconds}s")
    routed, cpu = meter.around(partial(run, chat, *flat_out))
    result["closed_loop"] = closed_loop_entry(routed, cpu)
    log(f"peers {name} closed loop: {result['closed_loop']}")
    body = {**request, "stream": True}
    streams = ("-mode", "stream", "-streams", str(steps.streams))
    direct_runs, routed_runs, stream_cpu = [], [], []
    for _ in range(steps.stream_rounds):
        direct_runs.append(run(direct_chat, *streams, body=body))
        meter.wait_idle(name)
        routed, cpu = meter.around(partial(run, chat, *streams, body=body))
        routed_runs.append(routed)
        stream_cpu.append(cpu)
    total = Cpu(sum(c.system for c in stream_cpu), sum(c.others for c in stream_cpu))
    result["streaming"] = streaming_entry(direct_runs, routed_runs, total, peak_rss_mb())
    log(f"peers {name} streaming: {result['streaming']}")
    return result


def bench_peers(work: Path, quick: bool) -> Result:
    steps = plan(quick)
    missing = {peer.name: f"{peer.path().relative_to(REPO)} is missing; install with `{INSTALL_HINT}`"
               for peer in PEERS if not peer.path().exists()}  # fmt: skip
    for name, why in missing.items():
        log(f"peers: not measuring {name}: {why}")
    if len(missing) == len(PEERS):
        return {"reason": f"No peer is installed; run `{INSTALL_HINT}` first.", "skipped": missing}
    pins = pinning(os.sched_getaffinity(0))
    system_cpus, driver = pins if pins else (None, None)
    if not pins:
        log("peers: CPUs 0 and 1 are not both available; nothing is pinned")
    peers = [peer for peer in PEERS if peer.name not in missing]
    ours = modelfleet_version()
    result: Result = {
        "plan": vars(steps),
        "pinning": {"system": system_cpus, "driver": driver} if pins else None,
        "versions": {
            MODELFLEET: ours,
            MODELFLEET_CACHED: ours,
            **{peer.name: installed_version(peer) for peer in peers},
        },
        "skipped": missing,
        "systems": {},
    }
    starters: dict[str, Callable[[str], contextlib.AbstractContextManager[tuple[str, Process]]]] = {
        MODELFLEET: lambda url: router(work, url, cache_size="0", cpus=system_cpus),
        MODELFLEET_CACHED: lambda url: router(work, url, cpus=system_cpus),
        LITELLM.name: lambda url: litellm_proxy(work, url, system_cpus),
        VLLM_ROUTER.name: lambda url: vllm_router(work, url, system_cpus),
    }
    with pinned_here(driver), upstream(work, chunks=20, interval="50ms", cpus=driver) as direct_base:
        for name in (MODELFLEET, MODELFLEET_CACHED, *(peer.name for peer in peers)):
            started = time.monotonic()
            with starters[name](direct_base) as (base, process):
                startup = round(time.monotonic() - started, 1)
                log(f"peers: {name} ready in {startup} s")
                meter = CpuMeter(process.popen.pid, int(system_cpus) if system_cpus else None)
                # The cached run asks the same deterministic question every time: all hits after the first.
                request = {**CHAT, "temperature": 0} if name == MODELFLEET_CACHED else CHAT
                measured = measure(name, base, meter, direct_base, steps, driver, request, process.rss_peak_mb)
                result["systems"][name] = {"startup_s": startup, **measured}
    result["ratios"] = ratios(result["systems"])
    log(f"peers ratios (ModelFleet / peer): {result['ratios']}")
    return result
