"""Conditions that say what is true now, computed from what the operator observed (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from modelfleet.api.conditions import FAILED_READY_REASONS, ConditionType, Reason
from modelfleet.api.naming import WARMED_UP_CONDITION

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Observed:
    """The children as read from the API server in this reconcile."""

    managed: bool = True
    deployment: Manifest | None = None
    pods: list[Manifest] = field(default_factory=list)
    prefetch_job: Manifest | None = None
    prefetch_expected: bool = True
    # The prefetch script's own account of why the download failed (its termination message).
    prefetch_failure: str = ""
    # The existingClaim that was named but does not exist.
    missing_claim: str = ""
    endpoint_url: str | None = None
    endpoint_reachable: bool | None = None
    endpoint_error: str = ""
    # Why the spec cannot be carried out (it does not parse, or the API server refused a child built
    # from it): no retry can fix that, only a new spec.
    rejected: str = ""
    # The API server refused the HPA's minReplicas 0 (no HPAScaleToZero): the model keeps one replica.
    scale_to_zero_refused: str = ""
    # spec.replicas is 0: unloaded on purpose, not scaled to zero by the autoscaler.
    unloaded: bool = False


@dataclass(frozen=True)
class ConditionState:
    type: str
    status: str
    reason: str
    message: str


def job_state(job: Manifest | None, failure: str = "") -> tuple[str, str]:
    """('Complete' | 'Failed' | 'Running' | 'Missing', message)."""
    if job is None:
        return "Missing", "the prefetch Job does not exist yet"
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return "Complete", "weights are in the cache volume"
        if condition.get("type") == "Failed":
            name = job.get("metadata", {}).get("name", "")
            if failure:
                # The download's own words say what to fix; the Job's reason says only that it stopped.
                return "Failed", f"prefetch Job {name} failed: {failure}"
            return (
                "Failed",
                f"prefetch Job {name} failed: {condition.get('reason', '')}: {condition.get('message', '')}".strip(),
            )
    active = job.get("status", {}).get("active") or 0
    failed = job.get("status", {}).get("failed") or 0
    detail = f" ({failed} failed attempt{'s' if failed != 1 else ''} so far)" if failed else ""
    return "Running", f"downloading weights, {active} pod(s) active{detail}"


def unschedulable_messages(pods: list[Manifest]) -> list[str]:
    messages = []
    for pod in pods:
        for condition in pod.get("status", {}).get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                messages.append(condition.get("message") or condition.get("reason") or "unschedulable")
    return messages


def explain_unschedulable(message: str, gpu_resource: str, gpus: int) -> str:
    """Turn the scheduler's message into one that says what to do."""
    if f"Insufficient {gpu_resource}" in message:
        return (
            f"waiting for {gpu_resource}: {gpus} per replica; no node has enough free GPUs "
            f"({message}). Free GPUs, add GPU nodes, or lower spec.resources.gpu."
        )
    return f"pods cannot be scheduled: {message}"


def crash_looping(pods: list[Manifest]) -> list[str]:
    found = []
    for pod in pods:
        for status in pod.get("status", {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in {
                "CrashLoopBackOff",
                "ImagePullBackOff",
                "ErrImagePull",
                "CreateContainerError",
            }:
                found.append(f"{pod['metadata']['name']}: {waiting['reason']}: {waiting.get('message', '')}".strip())
    return found


def pod_condition(pod: Manifest, kind: str) -> Manifest | None:
    conditions: list[Manifest] = pod.get("status", {}).get("conditions") or []
    return next((condition for condition in conditions if condition.get("type") == kind), None)


# What engines say when a model could not be loaded for lack of memory. Ollama's runner is a child
# process: under a cgroup v1 memory limit the kernel kills it, not the container, and the server
# reports "signal: killed" or a failed load "due to resource limitations".
LOAD_FAILURES = ("signal: killed", "resource limitations", "out of memory", "CUDA out of memory")


def out_of_memory(pods: list[Manifest], memory: str | None) -> tuple[str, list[str]]:
    """('OOMKilled' | 'OutOfMemory' | '', what happened per pod).

    OOMKilled: the kubelet saw a container killed for memory. OutOfMemory: the engine could not load
    the model, and the pod has a memory limit, so memory is the likely cause (the kernel's kill of a
    child process is not reported by the kubelet).
    """
    limit = f"the memory limit ({memory})" if memory else "the memory available"
    killed, failed = [], []
    for pod in pods:
        name = pod["metadata"]["name"]
        for status in pod.get("status", {}).get("containerStatuses") or []:
            states = (status.get("state") or {}, status.get("lastState") or {})
            if any(((state.get("terminated") or {}).get("reason")) == "OOMKilled" for state in states):
                killed.append(f"{name}: the engine was OOM-killed: it needs more than {limit}")
        warm = pod_condition(pod, WARMED_UP_CONDITION) or {}
        message = str(warm.get("message", ""))
        if memory and warm.get("status") == "False" and any(text in message for text in LOAD_FAILURES):
            failed.append(f"{name}: the engine could not load the model, most likely for exceeding {limit} ({message})")
    if killed:
        return Reason.OOM_KILLED, sorted(set(killed))
    return (Reason.OUT_OF_MEMORY, sorted(set(failed))) if failed else ("", [])


def warmup_failures(pods: list[Manifest]) -> list[str]:
    failures = []
    for pod in pods:
        warm = pod_condition(pod, WARMED_UP_CONDITION) or {}
        if warm.get("status") == "False" and warm.get("reason") == Reason.WARM_UP_FAILED:
            failures.append(f"{pod['metadata']['name']}: {warm.get('message', '')}")
    return failures


# Longest condition message we write: an API server's refusal can list many fields.
MAX_MESSAGE_LENGTH = 2048


def rejected_conditions(reason: str) -> list[ConditionState]:
    message = f"the spec cannot be carried out: {reason}"
    if len(message) > MAX_MESSAGE_LENGTH:
        message = message[: MAX_MESSAGE_LENGTH - 3] + "..."
    return [
        ConditionState(ConditionType.READY, "False", Reason.INVALID_SPEC, message),
        ConditionState(ConditionType.DEGRADED, "True", Reason.INVALID_SPEC, message),
        ConditionState(ConditionType.PROGRESSING, "False", Reason.INVALID_SPEC, "stopped until the spec is changed"),
    ]


@dataclass(frozen=True)
class PodTrouble:
    """What the serving pods show is wrong, in the words the conditions use."""

    unschedulable: list[str]
    crashes: list[str]
    oom_reason: str
    oom: list[str]
    warmups_failing: list[str]

    @classmethod
    def of(cls, pods: list[Manifest], memory: str | None) -> PodTrouble:
        oom_reason, oom = out_of_memory(pods, memory)
        return cls(unschedulable_messages(pods), crash_looping(pods), oom_reason, oom, warmup_failures(pods))

    @property
    def oom_message(self) -> str:
        return "; ".join(self.oom) + "; raise spec.resources.memory"


def conditions_for(
    observed: Observed, gpu_resource: str = "nvidia.com/gpu", gpus: int = 0, memory: str | None = None
) -> list[ConditionState]:
    if observed.rejected:
        return rejected_conditions(observed.rejected)
    if observed.missing_claim:
        return missing_claim_conditions(observed.missing_claim)
    if not observed.managed:
        return [endpoint_condition(observed)]
    job, job_message = (
        job_state(observed.prefetch_job, observed.prefetch_failure)
        if observed.prefetch_expected
        else ("Complete", "no download")
    )
    trouble = PodTrouble.of(observed.pods, memory)
    scheduled = scheduled_condition(observed, trouble, job, gpu_resource, gpus)
    states = [
        cached_condition(job, job_message),
        scheduled,
        degraded_condition(trouble, job, job_message),
        ready_condition(observed, trouble, job, job_message, scheduled.message),
    ]
    if observed.scale_to_zero_refused:
        states.append(
            ConditionState(
                ConditionType.SCALE_TO_ZERO,
                "False",
                Reason.NOT_SUPPORTED_BY_CLUSTER,
                "the HPA keeps 1 replica: this API server refuses minReplicas 0 (HPAScaleToZero is on by default "
                f"from Kubernetes 1.37): {observed.scale_to_zero_refused}",
            )
        )
    states.append(progressing_condition(observed, job))
    return states


def missing_claim_conditions(claim: str) -> list[ConditionState]:
    message = (
        f"PersistentVolumeClaim {claim} (spec.cache.existingClaim) does not exist in this "
        "namespace: create it, or remove existingClaim to let the operator create one"
    )
    return [
        ConditionState(ConditionType.MODEL_CACHED, "False", Reason.CLAIM_NOT_FOUND, message),
        ConditionState(ConditionType.DEGRADED, "True", Reason.CLAIM_NOT_FOUND, message),
        ConditionState(ConditionType.READY, "False", Reason.CLAIM_NOT_FOUND, message),
        ConditionState(ConditionType.PROGRESSING, "False", Reason.CLAIM_NOT_FOUND, "waiting for the claim"),
    ]


def endpoint_condition(observed: Observed) -> ConditionState:
    if observed.endpoint_reachable:
        return ConditionState(
            ConditionType.READY, "True", Reason.ENDPOINT_REACHABLE, f"{observed.endpoint_url} answers"
        )
    return ConditionState(
        ConditionType.READY,
        "False",
        Reason.ENDPOINT_UNREACHABLE,
        f"{observed.endpoint_url}: {observed.endpoint_error}".strip(),
    )


def cached_condition(job: str, job_message: str) -> ConditionState:
    return {
        "Complete": ConditionState(ConditionType.MODEL_CACHED, "True", Reason.PREFETCHED, job_message),
        "Failed": ConditionState(ConditionType.MODEL_CACHED, "False", Reason.PREFETCH_FAILED, job_message),
        "Running": ConditionState(ConditionType.MODEL_CACHED, "False", Reason.DOWNLOADING, job_message),
        "Missing": ConditionState(ConditionType.MODEL_CACHED, "False", Reason.PENDING, job_message),
    }[job]


def scheduled_condition(
    observed: Observed, trouble: PodTrouble, job: str, gpu_resource: str, gpus: int
) -> ConditionState:
    if trouble.unschedulable:
        message = explain_unschedulable(trouble.unschedulable[0], gpu_resource, gpus)
        return ConditionState(ConditionType.SCHEDULED, "False", Reason.UNSCHEDULABLE, message)
    if observed.pods:
        message = f"{len(observed.pods)} pod(s) placed on nodes"
        return ConditionState(ConditionType.SCHEDULED, "True", Reason.SCHEDULED, message)
    if job != "Complete":
        message = "pods start once the weights are cached"
        return ConditionState(ConditionType.SCHEDULED, "Unknown", Reason.WAITING_FOR_CACHE, message)
    return ConditionState(ConditionType.SCHEDULED, "Unknown", Reason.NO_PODS, "no pods exist yet")


def degraded_condition(trouble: PodTrouble, job: str, job_message: str) -> ConditionState:
    if trouble.oom:
        return ConditionState(ConditionType.DEGRADED, "True", trouble.oom_reason, trouble.oom_message)
    if trouble.crashes:
        return ConditionState(ConditionType.DEGRADED, "True", Reason.CONTAINERS_FAILING, "; ".join(trouble.crashes))
    if trouble.warmups_failing:
        message = "; ".join(trouble.warmups_failing)
        return ConditionState(ConditionType.DEGRADED, "True", Reason.WARM_UP_FAILED, message)
    if job == "Failed":
        return ConditionState(ConditionType.DEGRADED, "True", Reason.PREFETCH_FAILED, job_message)
    return ConditionState(ConditionType.DEGRADED, "False", Reason.AS_EXPECTED, "no failures observed")


def ready_condition(
    observed: Observed, trouble: PodTrouble, job: str, job_message: str, unschedulable_message: str
) -> ConditionState:
    """Ready, or the first reason it is not, most actionable first."""
    desired, ready_replicas = replica_counts(observed)
    # The common case first: a serving model needs none of the messages below.
    if ready_replicas > 0 and not trouble.crashes:
        message = f"{ready_replicas}/{desired} replica(s) ready to serve"
        return ConditionState(ConditionType.READY, "True", Reason.REPLICAS_READY, message)
    not_ready: list[tuple[bool, Reason | str, str]] = [
        (bool(trouble.oom), trouble.oom_reason, trouble.oom_message),
        (job == "Failed", Reason.PREFETCH_FAILED, job_message),
        (bool(trouble.unschedulable), Reason.UNSCHEDULABLE, unschedulable_message),
        (bool(trouble.crashes), Reason.CONTAINERS_FAILING, "; ".join(trouble.crashes)),
        (job != "Complete", Reason.DOWNLOADING, job_message),
        (
            observed.unloaded,
            Reason.UNLOADED,
            "spec.replicas is 0: the model is unloaded and its requests fail; load it with `kubectl scale "
            "inferencemodel <name> --replicas=N` or the router's POST /v1/admin/models/<name>/load",
        ),
        (
            observed.deployment is not None and desired == 0,
            Reason.SCALED_TO_ZERO,
            "0 replicas are wanted; scale up to serve the model",
        ),
        (bool(trouble.warmups_failing), Reason.WARM_UP_FAILED, "; ".join(trouble.warmups_failing)),
    ]
    for applies, reason, message in not_ready:
        if applies:
            return ConditionState(ConditionType.READY, "False", reason, message)
    message = f"0/{desired} replica(s) ready; the model is loading (a pod is Ready once it answers a warm-up)"
    return ConditionState(ConditionType.READY, "False", Reason.LOADING, message)


def replica_counts(observed: Observed) -> tuple[int, int]:
    """(the replicas the Deployment wants, those ready)."""
    deployment = observed.deployment or {}
    return deployment.get("spec", {}).get("replicas", 0), deployment.get("status", {}).get("readyReplicas") or 0


def progressing_condition(observed: Observed, job: str) -> ConditionState:
    desired, ready_replicas = replica_counts(observed)
    progressing = observed.deployment is None or ready_replicas < desired or job in {"Running", "Missing"}
    return ConditionState(
        ConditionType.PROGRESSING,
        "True" if progressing else "False",
        Reason.RECONCILING if progressing else Reason.STABLE,
        "rolling out" if progressing else "all replicas are up to date",
    )


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def seconds_between(start: str | None, end: str | None) -> float | None:
    began, ended = parse_time(start), parse_time(end)
    if began is None or ended is None:
        return None
    return max(0.0, (ended - began).total_seconds())


def condition_time(pod: Manifest, kind: str) -> str | None:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            time_value: str | None = condition.get("lastTransitionTime")
            return time_value
    return None


def phase_timings(observed: Observed) -> dict[str, float]:
    """Download, schedule and load durations of the latest start, from the API's own timestamps."""
    timings: dict[str, float | None] = {}
    job_status = (observed.prefetch_job or {}).get("status") or {}
    timings["downloadSeconds"] = seconds_between(job_status.get("startTime"), job_status.get("completionTime"))
    if observed.pods:
        newest = max(observed.pods, key=lambda pod: pod.get("metadata", {}).get("creationTimestamp") or "")
        created = newest.get("metadata", {}).get("creationTimestamp")
        scheduled = condition_time(newest, "PodScheduled")
        engine_up = condition_time(newest, "ContainersReady")
        timings["scheduleSeconds"] = seconds_between(created, scheduled)
        timings["loadSeconds"] = seconds_between(scheduled, engine_up)
        timings["warmupSeconds"] = seconds_between(engine_up, condition_time(newest, WARMED_UP_CONDITION))
    return {key: value for key, value in timings.items() if value is not None}


def phase_for(states: list[ConditionState]) -> str:
    by_type = {state.type: state for state in states}
    if by_type[ConditionType.READY].status == "True":
        return (
            "Degraded"
            if by_type.get(ConditionType.DEGRADED, by_type[ConditionType.READY]).status == "True"
            else "Ready"
        )
    reason = by_type[ConditionType.READY].reason
    if reason in FAILED_READY_REASONS:
        return "Failed"
    if reason == Reason.DOWNLOADING:
        return "Downloading"
    if reason == Reason.LOADING:
        return "Loading"
    if reason in {Reason.SCALED_TO_ZERO, Reason.UNLOADED}:
        return "Idle"
    return "Pending"


def merge_conditions(
    previous: list[Manifest], states: list[ConditionState], generation: int, now: datetime | None = None
) -> list[Manifest]:
    """New conditions, keeping lastTransitionTime where the status did not change."""
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    old = {c.get("type"): c for c in previous}
    merged = []
    for state in states:
        before = old.get(state.type)
        transition = before.get("lastTransitionTime") if before and before.get("status") == state.status else stamp
        merged.append(
            {
                "type": state.type,
                "status": state.status,
                "reason": state.reason,
                "message": state.message,
                "observedGeneration": generation,
                "lastTransitionTime": transition,
            }
        )
    return merged


def transitions(previous: list[Manifest], states: list[ConditionState]) -> list[ConditionState]:
    """Conditions whose status or reason changed: each deserves an Event."""
    old = {c.get("type"): (c.get("status"), c.get("reason")) for c in previous}
    return [s for s in states if old.get(s.type) != (s.status, s.reason)]
