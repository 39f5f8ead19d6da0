"""The operator bench's reading of kube-apiserver's own metrics (hack/bench/run.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hack.bench.run import apiserver_load, apiserver_sample, cpu_load, cpu_sample

pytestmark = pytest.mark.unit


def exposition(cpu: float, posts: int, post_seconds: float, lists: int, list_seconds: float, waits: int,
               wait_seconds: float, etcd_writes: int = 0, etcd_write_seconds: float = 0.0) -> str:  # fmt: skip
    return f"""# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total {cpu}
# TYPE apiserver_request_duration_seconds histogram
apiserver_request_duration_seconds_bucket{{verb="POST",resource="services",le="+Inf"}} {posts}
apiserver_request_duration_seconds_sum{{verb="POST",resource="services"}} {post_seconds}
apiserver_request_duration_seconds_count{{verb="POST",resource="services"}} {posts}
apiserver_request_duration_seconds_sum{{verb="LIST",resource="pods"}} {list_seconds}
apiserver_request_duration_seconds_count{{verb="LIST",resource="pods"}} {lists}
apiserver_request_duration_seconds_sum{{verb="WATCH",resource="pods"}} 9999
apiserver_request_duration_seconds_count{{verb="WATCH",resource="pods"}} 7
# TYPE apiserver_flowcontrol_request_wait_duration_seconds histogram
apiserver_flowcontrol_request_wait_duration_seconds_sum{{priority_level="workload-low"}} {wait_seconds}
apiserver_flowcontrol_request_wait_duration_seconds_count{{priority_level="workload-low"}} {waits}
# TYPE etcd_request_duration_seconds histogram
etcd_request_duration_seconds_sum{{operation="create",type="services"}} {etcd_write_seconds / 2}
etcd_request_duration_seconds_count{{operation="create",type="services"}} {etcd_writes // 2}
etcd_request_duration_seconds_sum{{operation="update",type="pods"}} {etcd_write_seconds / 2}
etcd_request_duration_seconds_count{{operation="update",type="pods"}} {etcd_writes - etcd_writes // 2}
etcd_request_duration_seconds_sum{{operation="get",type="pods"}} 500
etcd_request_duration_seconds_count{{operation="get",type="pods"}} 1000
"""


def test_the_sample_reads_cpu_requests_by_verb_without_watches_and_queue_waits() -> None:
    sample = apiserver_sample(exposition(10.0, 5, 0.5, 2, 0.2, 4, 0.04))
    assert sample["cpu_s"] == 10.0
    assert sample["requests"] == {"POST": 5, "LIST": 2}
    assert sample["seconds"] == {"POST": 0.5, "LIST": 0.2}
    assert (sample["apf_waits"], sample["apf_wait_s"]) == (4, 0.04)


def test_the_sample_reads_etcd_requests_by_operation() -> None:
    sample = apiserver_sample(exposition(10.0, 5, 0.5, 2, 0.2, 4, 0.04, etcd_writes=10, etcd_write_seconds=0.3))
    assert sample["etcd_requests"] == {"create": 5, "update": 5, "get": 1000}
    assert sample["etcd_seconds"] == {"create": 0.15, "update": 0.15, "get": 500}


def test_the_load_between_two_samples() -> None:
    before = apiserver_sample(exposition(10.0, 5, 0.5, 2, 0.2, 4, 0.04, etcd_writes=10, etcd_write_seconds=0.3))
    after = apiserver_sample(exposition(25.0, 205, 20.5, 102, 1.2, 304, 3.04, etcd_writes=410,
                                        etcd_write_seconds=20.3))  # fmt: skip
    load = apiserver_load(before, after, seconds=10.0)
    # etcd's reads (1,000 gets in both samples) are not writes: 400 writes in 20 s of etcd time.
    assert load == {"seconds": 10.0, "cpu_cores": 1.5, "writes_per_s": 20.0, "reads_per_s": 10.0,
                    "write_latency_ms": 100.0, "read_latency_ms": 10.0, "apf_wait_ms": 10.0,
                    "etcd_writes_per_s": 40.0, "etcd_write_latency_ms": 50.0}  # fmt: skip


def fake_proc(root: Path, busy_ticks: int, processes: dict[int, tuple[str, int, int]]) -> Path:
    """A /proc with its stat line (user nice system idle iowait irq softirq steal) and per-PID stats."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text(f"cpu  {busy_ticks} 0 0 5000 300 0 0 0 0 0\ncpu0 0 0 0 0\n")
    for pid, (command, user, system) in processes.items():
        (root / str(pid)).mkdir(exist_ok=True)
        fields = ["S", "1", *["0"] * 9, str(user), str(system), "7", "7"]  # fields 3 to 17 of proc(5)
        (root / str(pid) / "stat").write_text(f"{pid} ({command}) {' '.join(fields)} 0 0\n")
    return root


def test_cpu_by_cluster_command_and_the_whole_machine(tmp_path: Path) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    before = cpu_sample(fake_proc(tmp_path / "a", 10 * ticks, {
        10: ("kube-apiserver", 2 * ticks, ticks), 11: ("etcd", ticks, 0), 12: ("kwok", 0, 0),
        13: ("kwok", 0, 0), 14: ("bash", 50 * ticks, 0), 15: ("idle", 0, 0),
    }))  # fmt: skip
    after = cpu_sample(fake_proc(tmp_path / "b", 30 * ticks, {
        10: ("kube-apiserver", 10 * ticks, 3 * ticks), 11: ("etcd", 3 * ticks, ticks), 12: ("kwok", ticks, 0),
        13: ("kwok", ticks, ticks), 14: ("bash", 90 * ticks, 0),
    }))  # fmt: skip
    # Idle and iowait are not work; two kwok processes add up; busiest first; under 0.01 cores left out.
    load = cpu_load(before, after, 10.0, operator=4.0)
    assert load == {"machine": 2.0, "machine_cores": os.cpu_count(), "operator": 0.4, "bash": 4.0,
                    "kube-apiserver": 1.0, "etcd": 0.3, "kwok": 0.3}  # fmt: skip
    assert list(load)[3:] == ["bash", "kube-apiserver", "etcd", "kwok"]
