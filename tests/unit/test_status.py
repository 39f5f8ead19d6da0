"""Conditions tell the truth: crash loops are not Ready, GPU shortages say so, failures say why."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from modelfleet.operator.status import (
    Observed,
    conditions_for,
    merge_conditions,
    phase_for,
    phase_timings,
    transitions,
)

pytestmark = pytest.mark.unit

COMPLETE_JOB = {"status": {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}}
RUNNING_JOB = {"status": {"active": 1, "failed": 2}}
FAILED_JOB = {
    "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                               "message": "Job has reached the specified backoff limit"}]}
}  # fmt: skip


def deployment(replicas: int, ready: int) -> dict[str, Any]:
    return {"spec": {"replicas": replicas}, "status": {"readyReplicas": ready}}


def pod(name: str, scheduled: bool = True, waiting: str | None = None, message: str = "") -> dict[str, Any]:
    conditions = [{"type": "PodScheduled", "status": "True" if scheduled else "False", "reason": "Unschedulable",
                   "message": message}]  # fmt: skip
    status: dict[str, Any] = {"conditions": conditions}
    if waiting:
        status["containerStatuses"] = [{"state": {"waiting": {"reason": waiting, "message": "back-off 5m0s"}}}]
    return {"metadata": {"name": name}, "status": status}


def by_type(observed: Observed, **kwargs: Any) -> dict[str, tuple[str, str, str]]:
    return {s.type: (s.status, s.reason, s.message) for s in conditions_for(observed, **kwargs)}


def test_ready_when_replicas_are_ready_and_weights_cached() -> None:
    observed = Observed(deployment=deployment(2, 2), pods=[pod("a"), pod("b")], prefetch_job=COMPLETE_JOB)
    states = conditions_for(observed)
    conditions = {s.type: s for s in states}
    assert conditions["Ready"].status == "True"
    assert conditions["ModelCached"].status == "True"
    assert conditions["Scheduled"].status == "True"
    assert conditions["Progressing"].status == "False"
    assert phase_for(states) == "Ready"


def test_crash_looping_pods_are_never_ready_even_if_counted_ready() -> None:
    observed = Observed(
        deployment=deployment(1, 1),
        pods=[pod("a", waiting="CrashLoopBackOff")],
        prefetch_job=COMPLETE_JOB,
    )
    conditions = by_type(observed)
    assert conditions["Ready"][0] == "False"
    assert conditions["Degraded"][:2] == ("True", "ContainersFailing")
    assert "CrashLoopBackOff" in conditions["Degraded"][2]


def test_gpu_shortage_names_the_gpu_and_what_to_do() -> None:
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    observed = Observed(deployment=deployment(1, 0), pods=[pod("a", scheduled=False, message=message)],
        prefetch_job=COMPLETE_JOB,
    )  # fmt: skip
    conditions = by_type(observed, gpu_resource="nvidia.com/gpu", gpus=8)
    assert conditions["Scheduled"][:2] == ("False", "Unschedulable")
    assert "waiting for nvidia.com/gpu: 8 per replica" in conditions["Scheduled"][2]
    assert "lower spec.resources.gpu" in conditions["Scheduled"][2]
    assert conditions["Ready"][:2] == ("False", "Unschedulable")


def test_prefetch_progress_and_failure() -> None:
    downloading = by_type(Observed(prefetch_job=RUNNING_JOB))
    assert downloading["ModelCached"][:2] == ("False", "Downloading")
    assert "2 failed attempts" in downloading["ModelCached"][2]
    assert downloading["Scheduled"][1] == "WaitingForCache"
    failed_states = conditions_for(Observed(prefetch_job=FAILED_JOB))
    failed = {s.type: s for s in failed_states}
    assert failed["Ready"].reason == "PrefetchFailed"
    assert "BackoffLimitExceeded" in failed["Ready"].message
    assert failed["Degraded"].status == "True"
    assert phase_for(failed_states) == "Failed"


def test_endpoint_models_report_reachability() -> None:
    up = by_type(Observed(managed=False, endpoint_url="http://x:1", endpoint_reachable=True))
    assert up == {"Ready": ("True", "EndpointReachable", "http://x:1 answers")}
    down = by_type(
        Observed(managed=False, endpoint_url="http://x:1", endpoint_reachable=False, endpoint_error="refused")
    )
    assert down["Ready"][:2] == ("False", "EndpointUnreachable")


def test_transition_times_survive_unchanged_status_and_transitions_are_reported() -> None:
    first = conditions_for(Observed(prefetch_job=RUNNING_JOB))
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    t1 = datetime(2026, 1, 2, tzinfo=UTC)
    merged = merge_conditions([], first, 1, now=t0)
    assert all(c["lastTransitionTime"] == "2026-01-01T00:00:00Z" for c in merged)
    assert all(c["observedGeneration"] == 1 for c in merged)
    second = conditions_for(Observed(deployment=deployment(1, 1), pods=[pod("a")], prefetch_job=COMPLETE_JOB))
    remerged = {c["type"]: c for c in merge_conditions(merged, second, 2, now=t1)}
    assert remerged["Ready"]["lastTransitionTime"] == "2026-01-02T00:00:00Z"  # False -> True
    assert remerged["Degraded"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"  # stayed False
    changed = {s.type for s in transitions(merged, second)}
    assert {"Ready", "ModelCached", "Scheduled"} <= changed
    assert "Degraded" not in changed
    assert transitions(merge_conditions(merged, second, 2), second) == []


def test_phase_timings_come_from_job_and_pod_timestamps() -> None:
    job = {"status": {"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:04:10Z"}}
    old_pod = {"metadata": {"creationTimestamp": "2026-01-01T00:04:00Z"}, "status": {}}
    new_pod = {
        "metadata": {"creationTimestamp": "2026-01-01T00:04:11Z"},
        "status": {"conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:04:13Z"},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-01-01T00:05:03Z"},
            {"type": "modelfleet.io/warmed-up", "status": "True", "lastTransitionTime": "2026-01-01T00:05:10Z"},
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:05:10Z"},
        ]},
    }  # fmt: skip
    timings = phase_timings(Observed(prefetch_job=job, pods=[old_pod, new_pod]))
    assert timings == {"downloadSeconds": 250.0, "scheduleSeconds": 2.0, "loadSeconds": 50.0, "warmupSeconds": 7.0}
    assert phase_timings(Observed(prefetch_job={"status": {"startTime": "2026-01-01T00:00:00Z"}})) == {}
