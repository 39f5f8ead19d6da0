"""Pure parts of hack/bench/peers.py (the peers side by side benchmark) and the run.py helpers it uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from hack.bench import peers
from hack.bench.harness import ProcStat, parse_proc_stat, pinned_argv
from hack.bench.run import markdown

pytestmark = pytest.mark.unit


# Configuration of the systems ------------------------------------------------------------------


def test_litellm_config_has_one_openai_model_at_the_upstream_and_no_database_or_key() -> None:
    config = yaml.safe_load(peers.litellm_config("http://127.0.0.1:4100", model="bench"))
    assert config["model_list"] == [
        {
            "model_name": "bench",
            "litellm_params": {"model": "openai/bench", "api_base": "http://127.0.0.1:4100/v1", "api_key": "none"},
        }
    ]
    general = config["general_settings"]
    assert "database_url" not in general
    assert "master_key" not in general
    # Without a master key the proxy refuses to start unless told so; like the router here, no auth.
    assert general["dangerously_permit_weak_or_unset_master_key"] is True
    assert config["litellm_settings"]["set_verbose"] is False
    assert "cache" not in config["litellm_settings"]


def test_litellm_runs_one_worker_on_loopback_with_an_environment_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = peers.litellm_argv(Path("/v/bin/litellm"), Path("/w/config.yaml"), 4101)
    assert argv == ["/v/bin/litellm", "--config", "/w/config.yaml", "--host", "127.0.0.1", "--port", "4101",
                    "--num_workers", "1"]  # fmt: skip
    monkeypatch.setenv("DATABASE_URL", "postgresql://somewhere/db")
    monkeypatch.setenv("LITELLM_MASTER_KEY", "sk-from-the-shell")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real")
    env = peers.litellm_env(Path("/w/home"))
    assert set(env) == {"PATH", "HOME", "LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_LOG"}
    assert env["HOME"] == "/w/home"
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"  # no fetch of the cost map at start


def test_vllm_router_argv_binds_loopback_round_robin_to_the_upstream() -> None:
    argv = peers.vllm_router_argv(Path("/v/bin/vllm-router"), "http://127.0.0.1:4100", 4102, 4103)

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert argv[0] == "/v/bin/vllm-router"
    assert value("--host") == "127.0.0.1"
    assert value("--port") == "4102"
    assert value("--worker-urls") == "http://127.0.0.1:4100"
    assert value("--policy") == "round_robin"
    # Its metrics listener would otherwise take a fixed port.
    assert value("--prometheus-host") == "127.0.0.1"
    assert value("--prometheus-port") == "4103"


def test_pinning_puts_the_system_on_cpu_1_and_the_rest_on_cpu_0_only_when_both_exist() -> None:
    assert peers.pinning({0, 1}) == ("1", "0")
    assert peers.pinning({0, 1, 2, 3}) == ("1", "0")
    assert peers.pinning({0}) is None
    assert peers.pinning({1, 2}) is None
    assert pinned_argv(["/bin/server", "-x"], "1") == ["taskset", "--cpu-list", "1", "/bin/server", "-x"]
    assert pinned_argv(["/bin/server", "-x"], None) == ["/bin/server", "-x"]


def test_peers_are_found_in_their_venvs(tmp_path: Path) -> None:
    assert peers.LITELLM.path(tmp_path) == tmp_path / ".venv-litellm-proxy" / "bin" / "litellm"
    assert peers.VLLM_ROUTER.path(tmp_path) == tmp_path / ".venv-vllm-router" / "bin" / "vllm-router"
    for peer in peers.PEERS:
        assert (Path(__file__).parents[2] / peer.requirements).is_file()


# The overload rule -----------------------------------------------------------------------------


def test_overloaded_above_one_percent_errors() -> None:
    assert not peers.overloaded(100, requests=990, errors=10, achieved_rps=99)  # exactly 1 %
    assert peers.overloaded(100, requests=989, errors=11, achieved_rps=99)
    assert peers.overloaded(100, requests=0, errors=0, achieved_rps=0)  # nothing answered at all


def test_overloaded_below_ninety_percent_of_the_rate() -> None:
    assert not peers.overloaded(500, requests=5000, errors=0, achieved_rps=450)  # exactly 90 %
    assert peers.overloaded(500, requests=5000, errors=0, achieved_rps=449.9)
    assert not peers.overloaded(50, requests=500, errors=0, achieved_rps=50.2)


# CPU accounting --------------------------------------------------------------------------------

# proc(5): pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
STAT = "{pid} ({comm}) S {ppid} 1 1 0 -1 4194560 100 0 0 0 {utime} {stime} {cutime} {cstime} 20 0 1 0 1 1 1"


def stat_text(pid: int, ppid: int, utime: int, stime: int = 0, cutime: int = 0, cstime: int = 0,
              comm: str = "python3") -> str:  # fmt: skip
    return STAT.format(pid=pid, comm=comm, ppid=ppid, utime=utime, stime=stime, cutime=cutime, cstime=cstime)


def test_parse_proc_stat_reads_cpu_ticks_past_a_command_name_with_spaces_and_parentheses() -> None:
    stat = parse_proc_stat(stat_text(4242, 17, utime=300, stime=40, cutime=7, cstime=2, comm="vllm::router) (x"))
    assert stat == ProcStat(pid=4242, ppid=17, user_ticks=300, system_ticks=40, children_user_ticks=7,
                            children_system_ticks=2)  # fmt: skip


def test_tree_cpu_counts_the_root_its_descendants_and_their_reaped_children_only() -> None:
    stats = {
        s.pid: s
        for s in map(
            parse_proc_stat,
            (
                stat_text(1, 0, utime=10_000),  # init: the root's parent, not counted
                stat_text(10, 1, utime=100, stime=20, cutime=5, cstime=5),  # the root
                stat_text(11, 10, utime=30),  # a worker
                stat_text(12, 11, utime=7, stime=3),  # the worker's child
                stat_text(20, 1, utime=999),  # an unrelated process
            ),
        )
    }
    assert peers.process_tree(10, stats) == [10, 11, 12]
    assert peers.tree_cpu_seconds(10, stats, ticks_per_second=100) == pytest.approx((130 + 30 + 10) / 100)
    assert peers.tree_cpu_seconds(11, stats, ticks_per_second=100) == pytest.approx(0.4)
    assert peers.tree_cpu_seconds(99, stats, ticks_per_second=100) == 0  # gone


def test_cpu_busy_ticks_of_one_cpu_from_proc_stat() -> None:
    lines = [
        "cpu  300 30 60 900 9 0 6 3 0 0",
        "cpu0 100 10 20 500 5 0 2 1 0 0",
        "cpu1 200 20 40 400 4 1 4 2 0 0",
        "intr 12345",
    ]
    text = "\n".join(lines) + "\n"
    # user + nice + system + irq + softirq: neither idle nor iowait nor steal.
    assert peers.cpu_busy_ticks(text, 1) == 200 + 20 + 40 + 1 + 4
    assert peers.cpu_busy_ticks(text, 0) == 100 + 10 + 20 + 0 + 2
    with pytest.raises(ValueError, match="cpu2"):
        peers.cpu_busy_ticks(text, 2)


def test_parse_listeners_reads_ipv4_and_ipv6_listening_sockets_of_the_given_inodes() -> None:
    tcp = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0\n"
        "   1: 00000000:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 112 1 0\n"
        "   2: 0100007F:1F92 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 113 1 0\n"
        "   3: 0100007F:1F93 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 999 1 0\n"
    )
    tcp6 = (
        "  sl  local_address                         remote_address                        st tx_queue rx_queue "
        "tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 00000000000000000000000001000000:1F94 00000000000000000000000000000000:0000 0A "
        "00000000:00000000 00:00000000 00000000     0        0 114 1 0\n"
        "   1: 00000000000000000000000000000000:1F95 00000000000000000000000000000000:0000 0A "
        "00000000:00000000 00:00000000 00000000     0        0 115 1 0\n"
    )
    inodes = {"111", "112", "113", "114", "115"}
    # 113 is a connection, not a listener; 999 is another process's.
    assert peers.parse_listeners(tcp, inodes) == [("127.0.0.1", 8080), ("0.0.0.0", 8081)]
    assert peers.parse_listeners(tcp6, inodes) == [("::1", 8084), ("::", 8085)]


# Entries and ratios ----------------------------------------------------------------------------


def run_result(rps: float, requests: int, errors: int = 0, p50: float = 1.0, p90: float = 2.0, p99: float = 3.0,
               duration: float = 10.0, ttft: float = 0.0, gap: float = 50.0) -> dict[str, Any]:  # fmt: skip
    return {
        "rps": rps, "requests": requests, "errors": errors, "duration_s": duration,
        "latency_ms": {"p50": p50, "p90": p90, "p99": p99},
        "ttft_ms": {"p50": ttft, "p99": ttft * 2},
        "chunk_gap_ms": {"p50": gap, "p99": gap * 2},
        "loadgen_cpu_percent_of_one_core": 12.5,
    }  # fmt: skip


def test_open_loop_entry_subtracts_the_direct_run_and_bills_cpu_per_request() -> None:
    direct = run_result(100, 1000, p50=0.5, p90=0.9, p99=2.0)
    routed = run_result(99.5, 995, errors=5, p50=1.75, p90=3.0, p99=9.0)
    entry = peers.open_loop_entry(100, direct, routed, peers.Cpu(system=1.99, others=0.5))
    assert entry["added_p50_ms"] == pytest.approx(1.25)
    assert entry["added_p90_ms"] == pytest.approx(2.1)
    assert entry["added_p99_ms"] == pytest.approx(7.0)
    assert entry["error_rate"] == pytest.approx(0.005)
    assert entry["overloaded"] is False
    assert entry["cpu_ms_per_request"] == pytest.approx(2.0)
    assert entry["others_cores"] == pytest.approx(0.05)


def test_open_loop_entry_without_a_single_answer_has_no_latency() -> None:
    entry = peers.open_loop_entry(500, run_result(500, 5000), run_result(0, 0, errors=5000), peers.Cpu(3.0))
    assert entry["overloaded"] is True
    assert entry["error_rate"] == 1.0
    assert entry["added_p50_ms"] is None
    assert entry["cpu_ms_per_request"] is None


def test_closed_loop_entry_requests_per_core_and_cpu_per_request() -> None:
    entry = peers.closed_loop_entry(run_result(1000, 10_000, duration=10), peers.Cpu(system=5.0, others=1.0))
    assert entry["cpu_cores"] == pytest.approx(0.5)
    assert entry["saturated"] is False
    assert entry["rps_per_core"] == pytest.approx(2000)
    assert entry["cpu_ms_per_request"] == pytest.approx(0.5)
    assert entry["others_cores"] == pytest.approx(0.1)
    assert peers.closed_loop_entry(run_result(500, 5000, duration=10), peers.Cpu(9.5))["saturated"] is True


def test_streaming_entry_ttft_and_gap_added_cpu_per_stream_and_rss() -> None:
    direct = [run_result(60, 64, ttft=20.0), run_result(60, 64, ttft=22.0), run_result(60, 64, ttft=30.0)]
    routed = [run_result(60, 64, ttft=25.0, gap=51.0), run_result(60, 63, errors=1, ttft=27.0, gap=52.0),
              run_result(60, 64, ttft=50.0, gap=60.0)]  # fmt: skip
    entry = peers.streaming_entry(direct, routed, peers.Cpu(system=0.382), peak_rss_mb=101.26)
    assert entry["streams"] == 192
    assert entry["failed"] == 1
    assert entry["ttft_added_p50_ms"] == pytest.approx(27.0 - 22.0)  # medians of the rounds
    assert entry["gap_added_p50_ms"] == pytest.approx(52.0 - 50.0)
    assert entry["gap_added_p99_ms"] == pytest.approx(104.0 - 100.0)
    assert entry["cpu_ms_per_stream"] == pytest.approx(2.0)
    assert entry["peak_rss_mb"] == 101.3


def system(cpu_ms: float, rps_per_core: float, added: dict[str, tuple[float, bool]], stream_cpu: float = 2.0,
           ttft_added: float = 5.0) -> dict[str, Any]:  # fmt: skip
    return {
        "open_loop": {rate: {"added_p50_ms": value, "overloaded": over} for rate, (value, over) in added.items()},
        "closed_loop": {"cpu_ms_per_request": cpu_ms, "rps_per_core": rps_per_core},
        "streaming": {"cpu_ms_per_stream": stream_cpu, "ttft_added_p50_ms": ttft_added},
    }


def test_ratios_are_modelfleet_over_each_peer_and_skip_overloaded_or_negative_rates() -> None:
    systems = {
        "modelfleet": system(1.0, 1000, {"50": (1.0, False), "100": (1.2, False), "300": (50.0, True)}),
        "litellm": system(
            10.0, 100, {"50": (4.0, False), "100": (9.0, True), "300": (0.0, True)}, stream_cpu=8.0, ttft_added=20.0
        ),
        "vllm-router": system(0.25, 4000, {"50": (-0.1, False), "100": (0.4, False), "300": (0.5, False)}),
    }
    result = peers.ratios(systems)
    assert set(result) == {"litellm", "vllm-router"}
    assert result["litellm"]["cpu_ms_per_request"] == pytest.approx(0.1)
    assert result["litellm"]["rps_per_core"] == pytest.approx(10.0)
    assert result["litellm"]["cpu_ms_per_stream"] == pytest.approx(0.25)
    assert result["litellm"]["ttft_added_p50_ms"] == pytest.approx(0.25)
    assert result["litellm"]["added_p50_ms_at_50"] == pytest.approx(0.25)
    assert result["litellm"]["added_p50_ms_at_100"] is None  # the peer was overloaded
    assert result["vllm-router"]["cpu_ms_per_request"] == pytest.approx(4.0)
    assert result["vllm-router"]["added_p50_ms_at_50"] is None  # noise below 0: no ratio
    assert result["vllm-router"]["added_p50_ms_at_100"] == pytest.approx(3.0)
    assert result["vllm-router"]["added_p50_ms_at_300"] is None  # ModelFleet was overloaded


# The table -------------------------------------------------------------------------------------


def peers_result() -> dict[str, Any]:
    def rate(value: int, p50: float, over: bool = False) -> dict[str, Any]:
        return {"rate": value, "achieved_rps": value * (0.5 if over else 1.0), "error_rate": 0.02 if over else 0.0,
                "added_p50_ms": p50, "added_p90_ms": p50 * 2, "added_p99_ms": p50 * 3,
                "cpu_ms_per_request": 0.8, "overloaded": over}  # fmt: skip

    def measured(open_loop: dict[str, Any], rps: float, saturated: bool) -> dict[str, Any]:
        return {
            "open_loop": open_loop,
            "closed_loop": {
                "rps": rps,
                "cpu_cores": 0.97 if saturated else 0.4,
                "saturated": saturated,
                "rps_per_core": rps,
                "cpu_ms_per_request": None if not rps else 1000 / rps,
                "others_cores": 0.02,
            },
            "streaming": {
                "ttft_added_p50_ms": None,
                "cpu_ms_per_stream": 3.5,
                "failed": 2,
                "streams": 64,
                "gap_added_p50_ms": 0.25,
                "gap_added_p99_ms": 12.0,
                "peak_rss_mb": 98.4,
            },
        }

    return {
        "plan": {"concurrency": 32},
        "pinning": {"system": "1", "driver": "0"},
        "versions": {"modelfleet": "0.1.0 (abc1234)", "vllm-router": "0.1.17"},
        "systems": {
            "modelfleet": measured({"100": rate(100, 1.25), "500": rate(500, 40.0, over=True)}, 1100, True),
            "vllm-router": measured({"100": rate(100, 0.5), "500": peers.not_run_entry(500, 300)}, 5000, False),
        },
        "ratios": {
            "vllm-router": {
                "cpu_ms_per_request": 4.545,
                "rps_per_core": 0.22,
                "cpu_ms_per_stream": None,
                "ttft_added_p50_ms": None,
                "added_p50_ms_at_100": 2.5,
                "added_p50_ms_at_500": None,
            }
        },
        "skipped": {"litellm": ".venv-litellm-proxy/bin/litellm is missing; install with `make install-bench-peers`"},
    }


def test_rows_render_each_rate_the_overload_mark_and_what_was_not_run() -> None:
    text = "\n".join(peers.rows(peers_result()))
    assert "each system alone on CPU 1, upstream and load generator on CPU 0" in text
    assert "modelfleet 0.1.0 (abc1234), vllm-router 0.1.17" in text
    assert "| modelfleet | 100 | 100 | 0.0% | 1.25 / 2.50 / 3.75 | 0.800 | ok |" in text
    assert "| modelfleet | 500 | 250 | 2.0% | 40.00 / 80.00 / 120.00 | 0.800 | **overloaded** |" in text
    assert "| vllm-router | 500 | — | — | — | — | not run: overloaded at 300 req/s already |" in text


def test_rows_render_flat_out_streaming_ratios_and_skipped_peers() -> None:
    text = "\n".join(peers.rows(peers_result()))
    assert "| modelfleet | 1,100 | 0.97 | 1,100 | 0.909 | 0.02 | — | 0.25 / 12.00 | 3.500 | 98 | 2 / 64 |" in text
    assert "| vllm-router | 5,000 | 0.40 (not saturated) |" in text
    assert "ModelFleet / vllm-router: CPU ms per request **4.545**, req/s per core 0.220" in text
    assert "added p50 at 100 req/s 2.500, 500 req/s —" in text
    assert "Not measured: litellm: .venv-litellm-proxy/bin/litellm is missing; install with" in text


def test_rows_of_a_skipped_section_say_how_to_install() -> None:
    skipped = {"reason": "No peer is installed; run `make install-bench-peers` first.", "skipped": {}}
    assert peers.rows(skipped) == ["Peers side by side: not run. No peer is installed; run "
                                   "`make install-bench-peers` first."]  # fmt: skip


def test_summary_has_one_row_per_system_with_added_latency_by_rate() -> None:
    rows = peers.summary(peers_result())
    assert [row["system"] for row in rows] == ["modelfleet", "vllm-router"]
    ours = rows[0]
    assert ours["version"] == "0.1.0 (abc1234)"
    assert (ours["rps_per_core"], ours["cpu_ms_per_request"]) == (1100, pytest.approx(1000 / 1100))
    # 300 was not measured, 500 was overloaded: neither has a figure to compare.
    assert ours["added_p50_ms"] == {"100": 1.25, "300": None, "500": None}
    assert ours["added_p99_ms"] == {"100": 3.75, "300": None, "500": None}
    assert (ours["stream_cpu_ms_per_stream"], ours["stream_added_gap_p99_ms"], ours["stream_peak_rss_mb"]) == (
        3.5, 12.0, 98.4)  # fmt: skip
    assert rows[1]["added_p50_ms"]["500"] is None  # not run


def test_run_markdown_includes_the_peers_table() -> None:
    results = {"machine": {"cpu": "x", "cores": 2, "memory_gib": 1, "python": "3.11"}, "total_seconds": 1,
               "peers_run": peers_result()}  # fmt: skip
    assert "| modelfleet | 100 | 100 | 0.0% | 1.25 / 2.50 / 3.75 | 0.800 | ok |" in markdown(results)
