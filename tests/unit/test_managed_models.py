"""Managed models: the weights' source, the prefetch key, the warm-up gate, the served name and failures."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from modelfleet.api import v1alpha1
from modelfleet.api.naming import SERVED_MODEL_ANNOTATION, WARMED_UP_CONDITION
from modelfleet.operator.builders import cache, workload
from modelfleet.operator.builders.common import ModelContext
from modelfleet.operator.reconcile import rollout_complete, served_model, volume_node
from modelfleet.operator.status import Observed, conditions_for, phase_for
from modelfleet.operator.warmup import WarmUpRequest, WarmUps, warmup_request
from modelfleet.server.cluster_models import models_from_cluster

pytestmark = pytest.mark.unit


def context(spec: dict[str, Any], **extra: Any) -> ModelContext:
    return ModelContext(
        name="gemma",
        namespace="models",
        uid="uid-1",
        spec=v1alpha1.InferenceModelSpec.model_validate(spec),
        **extra,
    )


OLLAMA = {"runtime": "ollama", "model": "gemma3:270m", "resources": {"gpu": 0}}
PRIVATE = {**OLLAMA, "source": {"registry": "10.244.0.1:5000", "insecure": True}}


def env_of(manifest: dict[str, Any]) -> dict[str, str]:
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    return {var["name"]: var.get("value", "") for var in container["env"]}


# The prefetch Job ------------------------------------------------------------------------------


def test_a_private_registry_model_is_pulled_from_it_and_stored_under_its_short_name() -> None:
    job = cache.build_prefetch_job(context(PRIVATE, cache_claim_uid="claim-1"))
    assert job is not None
    env = env_of(job)
    assert env["MODELFLEET_PULL"] == "10.244.0.1:5000/library/gemma3:270m", "Ollama needs the namespace"
    assert env["MODELFLEET_MODEL"] == "gemma3:270m", "clients and the serving pods use the short name"
    assert env["MODELFLEET_PULL_FLAGS"] == "--insecure"
    own_namespace = env_of(cache.build_prefetch_job(context({**PRIVATE, "model": "team/tuned:1b"})) or {})
    assert own_namespace["MODELFLEET_PULL"] == "10.244.0.1:5000/team/tuned:1b"
    # Without a source the model comes from Ollama's own registry, over TLS.
    public = env_of(cache.build_prefetch_job(context(OLLAMA)) or {})
    assert (public["MODELFLEET_PULL"], public["MODELFLEET_PULL_FLAGS"]) == ("gemma3:270m", "")


def test_a_registry_ca_is_mounted_and_trusted_by_the_pull() -> None:
    spec = {**OLLAMA, "source": {"registry": "registry.models.svc", "caConfigMapRef": {"name": "ca", "key": "pem"}}}
    job = cache.build_prefetch_job(context(spec))
    assert job is not None
    pod = job["spec"]["template"]["spec"]
    assert env_of(job)["SSL_CERT_FILE"] == cache.REGISTRY_CA_PATH
    assert env_of(job)["MODELFLEET_PULL_FLAGS"] == ""
    (volume,) = [v for v in pod["volumes"] if v["name"] == "registry-ca"]
    assert volume["configMap"] == {"name": "ca", "items": [{"key": "pem", "path": "ca.crt"}]}
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "registry-ca"]
    assert f"{mount['mountPath']}/ca.crt" == cache.REGISTRY_CA_PATH


def test_a_new_volume_gets_a_new_prefetch_job_even_under_the_same_claim_name() -> None:
    first = cache.prefetch_job_name(context(PRIVATE, cache_claim_uid="claim-1"))
    assert cache.prefetch_job_name(context(PRIVATE, cache_claim_uid="claim-1")) == first, "stable for one volume"
    assert cache.prefetch_job_name(context(PRIVATE, cache_claim_uid="claim-2")) != first, "a recreated claim"
    other_claim = {**PRIVATE, "cache": {"existingClaim": "weights-b"}}
    assert cache.prefetch_job_name(context(other_claim, cache_claim_uid="claim-3")) != first
    other_registry = {**PRIVATE, "source": {"registry": "mirror:5000", "insecure": True}}
    assert cache.prefetch_job_name(context(other_registry, cache_claim_uid="claim-1")) != first


def test_a_missing_model_fails_the_job_at_once_instead_of_retrying() -> None:
    job = cache.build_prefetch_job(context(PRIVATE))
    assert job is not None
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = [rule for rule in rules if rule["action"] == "FailJob"]
    assert fail[0]["onExitCodes"]["values"] == [cache.MODEL_NOT_FOUND_EXIT_CODE]
    assert f"exit {cache.MODEL_NOT_FOUND_EXIT_CODE}" in cache.OLLAMA_PULL_SCRIPT
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never", "a pod failure policy needs Never"


def test_with_a_read_write_once_volume_the_job_runs_where_the_serving_pods_mount_it() -> None:
    job = cache.build_prefetch_job(context(PRIVATE, volume_node="realnode-0"))
    assert job is not None
    terms = job["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert terms == [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["realnode-0"]}]}]
    rwx = {**PRIVATE, "cache": {"accessMode": "ReadWriteMany"}}
    assert (
        "affinity"
        not in (cache.build_prefetch_job(context(rwx, volume_node="realnode-0")) or {})["spec"]["template"]["spec"]
    )
    assert "affinity" not in (cache.build_prefetch_job(context(PRIVATE)) or {})["spec"]["template"]["spec"]


def test_volume_node_is_where_live_pods_run() -> None:
    pods = [
        {"metadata": {"deletionTimestamp": "x"}, "spec": {"nodeName": "old"}},
        {"metadata": {}, "spec": {"nodeName": "realnode-0"}},
        {"metadata": {}, "spec": {}},
    ]
    assert volume_node(pods) == "realnode-0"
    assert volume_node([]) is None


# The serving pods: readiness gate, served name, vLLM in a read-only volume ---------------------


@pytest.mark.parametrize("runtime", ["ollama", "vllm"])
def test_serving_pods_are_gated_on_the_warm_up_and_name_the_model_they_serve(runtime: str) -> None:
    spec = {"runtime": runtime, "model": "gemma3:270m" if runtime == "ollama" else "Qwen/Qwen2.5-0.5B"}
    deployment = workload.build_deployment(context(spec))
    template = deployment["spec"]["template"]
    assert template["spec"]["readinessGates"] == [{"conditionType": WARMED_UP_CONDITION}]
    served = template["metadata"]["annotations"][SERVED_MODEL_ANNOTATION]
    assert served == ("gemma3:270m" if runtime == "ollama" else "gemma")
    # A new model changes the pod template, so the pods roll (Ollama's args do not name the model).
    changed = workload.build_deployment(context({**spec, "model": "other:1b"}))
    assert changed["spec"]["template"] != template or runtime == "vllm"


@pytest.mark.parametrize("runtime", ["ollama", "vllm"])
def test_a_stopping_pod_serves_on_until_its_endpoint_is_withdrawn(runtime: str) -> None:
    pod = workload.build_deployment(context({"runtime": runtime, "model": "m"}))["spec"]["template"]["spec"]
    seconds = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 0 < seconds < pod["terminationGracePeriodSeconds"], "the sleep is part of the grace period"


def test_vllm_answers_to_the_model_and_to_the_stable_inferencemodel_name() -> None:
    args = workload.build_deployment(context({"runtime": "vllm", "model": "Qwen/Qwen2.5-0.5B"}))["spec"]["template"][
        "spec"
    ]["containers"][0]["args"]
    at = args.index("--served-model-name")
    assert args[at + 1 : at + 3] == ["Qwen/Qwen2.5-0.5B", "gemma"]


def test_vllm_runs_as_a_uid_without_a_passwd_entry_and_writes_caches_outside_the_read_only_volume() -> None:
    deployment = workload.build_deployment(context({"runtime": "vllm", "model": "Qwen/Qwen2.5-0.5B"}))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = env_of(deployment)
    # getpass.getuser() needs one of them when UID 1000 has no passwd entry.
    assert env["USER"] == env["LOGNAME"] == "modelfleet"
    (model_mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == workload.MODELS_MOUNT]
    assert model_mount["readOnly"] is True
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    for variable in ("HF_MODULES_CACHE", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
                     "VLLM_CACHE_ROOT", "TORCH_HOME"):  # fmt: skip
        path = env[variable]
        assert not path.startswith(workload.MODELS_MOUNT), f"{variable} is on the read-only volume"
        assert any(path == root or path.startswith(root + "/") for root in writable), f"{variable}: {path}"


# Warm-up ------------------------------------------------------------------------------------------


def pod(uid: str = "p1", **conditions: str) -> dict[str, Any]:
    return {
        "metadata": {"name": f"pod-{uid}", "namespace": "models", "uid": uid,
                     "annotations": {SERVED_MODEL_ANNOTATION: "gemma3:270m"}},
        "spec": {"readinessGates": [{"conditionType": WARMED_UP_CONDITION}], "nodeName": "n"},
        "status": {"phase": "Running", "podIP": "10.244.0.12",
                   "conditions": [{"type": kind.replace("_", "."), "status": value}
                                  for kind, value in conditions.items()]},
    }  # fmt: skip


def test_a_pod_is_warmed_up_once_its_engine_answers_health_checks_and_only_then() -> None:
    assert warmup_request(pod(ContainersReady="False"), "ollama", 11434) is None, "the engine is not up yet"
    request = warmup_request(pod(ContainersReady="True"), "ollama", 11434)
    assert request is not None
    assert request.url == "http://10.244.0.12:11434/api/generate"
    assert request.body["model"] == "gemma3:270m"
    assert request.body["options"] == {"num_predict": 1}, "one token: a real generation, as short as it gets"
    done = pod(ContainersReady="True")
    done["status"]["conditions"].append({"type": WARMED_UP_CONDITION, "status": "True"})
    assert warmup_request(done, "ollama", 11434) is None, "warmed up once is enough"
    vllm = warmup_request(pod(ContainersReady="True"), "vllm", 8000)
    assert vllm is not None
    assert vllm.url.endswith(":8000/v1/completions")
    assert vllm.body["max_tokens"] == 1
    ungated = pod(ContainersReady="True")
    ungated["spec"]["readinessGates"] = []
    assert warmup_request(ungated, "ollama", 11434) is None, "pods of an older template have no gate to set"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_warmups(
    warmups: WarmUps, pods: list[dict[str, Any]], written: list[tuple[str, dict[str, Any]]], count: int
) -> None:
    done = threading.Semaphore(0)
    original = warmups.set_condition

    def record(namespace: str, name: str, value: dict[str, Any]) -> None:
        original(namespace, name, value)
        done.release()

    warmups.set_condition = record
    assert warmups.ensure(pods, "ollama", 11434) == count
    for _ in range(count):
        assert done.acquire(timeout=30), "the warm-up never reported"
    warmups.set_condition = original


def test_warm_up_sets_the_condition_and_a_failure_is_retried_only_after_a_growing_delay() -> None:
    written: list[tuple[str, dict[str, Any]]] = []
    answers: list[Exception | None] = [OSError("connection refused"), OSError("signal: killed"), None]
    sent: list[WarmUpRequest] = []

    def sender(request: WarmUpRequest, timeout: float) -> None:
        sent.append(request)
        answer = answers.pop(0)
        if answer is not None:
            raise answer

    clock = FakeClock()
    warmups = WarmUps(set_condition=lambda ns, name, value: written.append((name, value)), timeout_seconds=5,
                      sender=sender, clock=clock)  # fmt: skip
    target = [pod(ContainersReady="True")]
    run_warmups(warmups, target, written, 1)
    assert written[-1][1]["status"] == "False"
    assert "connection refused" in written[-1][1]["message"]
    assert warmups.ensure(target, "ollama", 11434) == 0, "no retry before the delay"
    clock.now += 10
    run_warmups(warmups, target, written, 1)
    assert "signal: killed" in written[-1][1]["message"]
    clock.now += 10
    assert warmups.ensure(target, "ollama", 11434) == 0, "the delay doubled after the second failure"
    clock.now += 10
    run_warmups(warmups, target, written, 1)
    assert (written[-1][0], written[-1][1]["status"], written[-1][1]["reason"]) == ("pod-p1", "True", "WarmedUp")
    assert len(sent) == 3
    warmups.shutdown()


# Status --------------------------------------------------------------------------------------------

COMPLETE_JOB = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}


def by_type(states: list[Any]) -> dict[str, Any]:
    return {state.type: state for state in states}


def test_a_model_the_registry_lacks_is_reported_in_words_a_user_can_act_on() -> None:
    job = {"metadata": {"name": "im-gemma-prefetch-1"},
           "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                      "message": "Container prefetch for pod x failed with exit code 3"}]}}  # fmt: skip
    failure = "the registry has no model 10.244.0.1:5000/nope:1b (...): check spec.model and spec.source.registry"
    states = by_type(conditions_for(Observed(prefetch_job=job, prefetch_failure=failure)))
    assert states["ModelCached"].reason == "PrefetchFailed"
    assert states["Ready"].message == f"prefetch Job im-gemma-prefetch-1 failed: {failure}"
    assert states["Degraded"].status == "True"


def test_an_engine_killed_for_memory_shows_as_degraded_with_the_reason() -> None:
    deployment = {"spec": {"replicas": 1}, "status": {"replicas": 1, "readyReplicas": 0}}
    # The kubelet saw the container killed for memory.
    container_oom = pod(ContainersReady="False")
    container_oom["status"]["containerStatuses"] = [{"lastState": {"terminated": {"reason": "OOMKilled"}}}]
    states = conditions_for(Observed(deployment=deployment, pods=[container_oom], prefetch_job=COMPLETE_JOB),
                            memory="300Mi")  # fmt: skip
    found = by_type(states)
    assert (found["Degraded"].status, found["Degraded"].reason) == ("True", "OOMKilled")
    assert "300Mi" in found["Degraded"].message
    assert "raise spec.resources.memory" in found["Degraded"].message
    assert found["Ready"].reason == "OOMKilled"
    assert phase_for(states) == "Failed"
    # Ollama's runner (a child process) was killed while it loaded the model, under a memory limit.
    ollama_errors = [
        "llama runner process has terminated: signal: killed",
        "model failed to load, this may be due to resource limitations or an internal error",
    ]
    for engine_says in ollama_errors:
        killed = pod(ContainersReady="True")
        killed["status"]["conditions"].append(
            {"type": WARMED_UP_CONDITION, "status": "False", "reason": "WarmUpFailed",
             "message": f"the warm-up generation failed: HTTP 500: {engine_says}"})  # fmt: skip
        observed = Observed(deployment=deployment, pods=[killed], prefetch_job=COMPLETE_JOB)
        found = by_type(conditions_for(observed, memory="300Mi"))
        assert found["Degraded"].reason == "OutOfMemory", engine_says
        assert "most likely for exceeding the memory limit (300Mi)" in found["Degraded"].message
        # Without a memory limit, memory is not the likely cause: the engine's error is reported as is.
        assert by_type(conditions_for(observed))["Degraded"].reason == "WarmUpFailed"


def test_a_pod_still_warming_up_is_loading_and_a_failing_warm_up_says_why() -> None:
    deployment = {"spec": {"replicas": 1}, "status": {"replicas": 1, "readyReplicas": 0}}
    warming = by_type(conditions_for(Observed(deployment=deployment, pods=[pod(ContainersReady="True")],
                                              prefetch_job=COMPLETE_JOB)))  # fmt: skip
    assert (warming["Ready"].reason, warming["Degraded"].status) == ("Loading", "False")
    failing = pod(ContainersReady="True")
    failing["status"]["conditions"].append(
        {"type": WARMED_UP_CONDITION, "status": "False", "reason": "WarmUpFailed",
         "message": "the warm-up generation failed: HTTP 404: model 'x' not found"})  # fmt: skip
    found = by_type(conditions_for(Observed(deployment=deployment, pods=[failing], prefetch_job=COMPLETE_JOB)))
    assert found["Ready"].reason == "WarmUpFailed"
    assert "model 'x' not found" in found["Ready"].message


def test_a_missing_existing_claim_is_reported() -> None:
    states = by_type(conditions_for(Observed(missing_claim="weights-b")))
    assert states["Ready"].reason == "ClaimNotFound"
    assert "weights-b" in states["Ready"].message
    assert "existingClaim" in states["Ready"].message


# The served name follows the rollout -------------------------------------------------------------


def deployment(model: str, *, generation: int = 2, observed: int = 2, updated: int = 1, total: int = 1,
               ready: int = 1, replicas: int = 1) -> dict[str, Any]:  # fmt: skip
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": replicas,
                 "template": {"metadata": {"annotations": {SERVED_MODEL_ANNOTATION: model}}}},
        "status": {"observedGeneration": observed, "updatedReplicas": updated, "replicas": total,
                   "readyReplicas": ready},
    }  # fmt: skip


def test_the_served_model_changes_only_when_the_new_pods_are_all_ready() -> None:
    assert served_model(deployment("new:1b", updated=1, total=2, ready=1), "old:1b") == "old:1b", "old pod left"
    assert served_model(deployment("new:1b", updated=1, total=1, ready=0), "old:1b") == "old:1b", "warming up"
    assert served_model(deployment("new:1b", observed=1), "old:1b") == "old:1b", "not yet observed"
    assert served_model(deployment("new:1b"), "old:1b") == "new:1b"
    assert served_model(deployment("new:1b", ready=0), None) == "new:1b", "a new model has no old name"
    assert served_model(None, "old:1b") == "old:1b"
    assert rollout_complete(deployment("m", replicas=0, updated=0, total=0, ready=0))


def test_the_router_sends_the_served_model_not_the_new_spec() -> None:
    body = {
        "metadata": {"name": "gemma", "namespace": "models", "generation": 3},
        "spec": {"runtime": "ollama", "model": "gemma3:1b"},
        "status": {"servedModel": "gemma3:270m"},
    }
    (spec,) = models_from_cluster([body], [])
    assert (spec.name, spec.upstream_model) == ("gemma", "gemma3:270m")
    (fresh,) = models_from_cluster([{**body, "status": {}}], [])
    assert fresh.upstream_model == "gemma3:1b"
    endpoint = {**body, "spec": {"model": "m", "endpoint": {"url": "http://10.0.0.1:11434"}}}
    (unmanaged,) = models_from_cluster([endpoint], [])
    assert unmanaged.upstream_model == "m", "an endpoint model has no pods to roll"
