"""The builders' manifests in full, and the options that change them: what the API server receives.

test_builders.py checks invariants over every combination of options; these tests pin every field of a
few typical models, so that a changed name, number or flag in a builder fails a test.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest

from modelfleet.api import v1alpha1
from modelfleet.operator.builders import autoscaling, cache, common, networkpolicy, service, workload
from modelfleet.operator.builders.common import ModelContext, NetworkPeers
from tests.support.models import OWNER, make_context

pytestmark = pytest.mark.unit

OLLAMA = make_context("ollama", 0, "fixed-3", "rwo")
VLLM = make_context("vllm", 2, "router", "rwx")
ENGINE = make_context("vllm", 1, "engine", "existing")

SELECTOR = {"modelfleet.io/model": "demo", "app.kubernetes.io/component": "model-server"}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
GPU_PLACEMENT = {
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


def labels(component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "modelfleet-model",
        "app.kubernetes.io/instance": "demo",
        "app.kubernetes.io/managed-by": "modelfleet-operator",
        "app.kubernetes.io/component": component,
        "modelfleet.io/model": "demo",
    }


def meta(name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": "models", "labels": labels(component), "ownerReferences": [OWNER]}


def probes(path: str) -> dict[str, Any]:
    def probe(period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": "http"},
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": failures,
        }

    return {"startupProbe": probe(10, 180), "readinessProbe": probe(5, 3), "livenessProbe": probe(20, 3)}


def test_an_ollama_deployment_in_full() -> None:
    container = {
        "name": "ollama",
        "image": "docker.io/ollama/ollama:0.17.4",
        "args": ["serve"],
        "env": [
            {"name": "OLLAMA_HOST", "value": "0.0.0.0:11434"},
            {"name": "OLLAMA_MODELS", "value": "/models/ollama"},
            {"name": "OLLAMA_KEEP_ALIVE", "value": "-1"},
            {"name": "OLLAMA_NUM_PARALLEL", "value": "6"},
            {"name": "OLLAMA_NOPRUNE", "value": "1"},
            {"name": "HOME", "value": "/home/modelfleet"},
            {"name": "EXTRA", "value": "1"},
        ],
        "ports": [{"name": "http", "containerPort": 11434, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "4", "memory": "24Gi"}, "limits": {"memory": "24Gi"}},
        **probes("/api/version"),
        "lifecycle": {"preStop": {"sleep": {"seconds": 10}}},
        "volumeMounts": [
            {"name": "model-cache", "mountPath": "/models", "readOnly": False},
            {"name": "home", "mountPath": "/home/modelfleet"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": CONTAINER_SECURITY,
    }
    assert workload.build_deployment(OLLAMA) == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta("im-demo", "model-server"),
        "spec": {
            "selector": {"matchLabels": SELECTOR},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": labels("model-server"),
                    "annotations": {"modelfleet.io/served-model": "phi3:mini"},
                },
                "spec": {
                    "containers": [container],
                    "readinessGates": [{"conditionType": "modelfleet.io/warmed-up"}],
                    "volumes": [
                        {"name": "model-cache", "persistentVolumeClaim": {"claimName": "im-demo-cache"}},
                        {"name": "home", "emptyDir": {}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                    "securityContext": POD_SECURITY,
                    "terminationGracePeriodSeconds": 60,
                    "enableServiceLinks": False,
                    "affinity": {
                        "podAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [
                                {"labelSelector": {"matchLabels": SELECTOR}, "topologyKey": "kubernetes.io/hostname"}
                            ]
                        }
                    },
                },
            },
            "replicas": 3,
        },
    }


def test_a_vllm_deployment_on_two_gpus_in_full() -> None:
    cache_dir = "/home/modelfleet/.cache"
    container = {
        "name": "vllm",
        "image": "docker.io/vllm/vllm-openai:v0.32.0",
        "args": [
            *("--model", "Qwen/Qwen2.5-7B-Instruct-AWQ"),
            *("--served-model-name", "Qwen/Qwen2.5-7B-Instruct-AWQ", "demo"),
            *("--port", "8000", "--tensor-parallel-size", "2", "--max-num-seqs", "6"),
            *("--quantization", "awq"),
        ],
        "env": [
            {"name": "HF_HOME", "value": "/models/hf"},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "HOME", "value": "/home/modelfleet"},
            {"name": "USER", "value": "modelfleet"},
            {"name": "LOGNAME", "value": "modelfleet"},
            {"name": "HF_MODULES_CACHE", "value": f"{cache_dir}/huggingface/modules"},
            {"name": "XDG_CACHE_HOME", "value": cache_dir},
            {"name": "TRITON_CACHE_DIR", "value": f"{cache_dir}/triton"},
            {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{cache_dir}/torchinductor"},
            {"name": "VLLM_CACHE_ROOT", "value": f"{cache_dir}/vllm"},
            {"name": "TORCH_HOME", "value": f"{cache_dir}/torch"},
            {"name": "EXTRA", "value": "1"},
        ],
        "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "4", "memory": "24Gi"}, "limits": {"memory": "24Gi", "nvidia.com/gpu": "2"}},
        **probes("/health"),
        "lifecycle": {"preStop": {"sleep": {"seconds": 10}}},
        "volumeMounts": [
            {"name": "model-cache", "mountPath": "/models", "readOnly": True},
            {"name": "home", "mountPath": "/home/modelfleet"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": CONTAINER_SECURITY,
    }
    assert workload.build_deployment(VLLM) == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta("im-demo", "model-server"),
        "spec": {
            "selector": {"matchLabels": SELECTOR},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels("model-server"), "annotations": {"modelfleet.io/served-model": "demo"}},
                "spec": {
                    "containers": [container],
                    "readinessGates": [{"conditionType": "modelfleet.io/warmed-up"}],
                    "volumes": [
                        {"name": "model-cache", "persistentVolumeClaim": {"claimName": "im-demo-cache"}},
                        {"name": "home", "emptyDir": {}},
                        {"name": "tmp", "emptyDir": {}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                    ],
                    "securityContext": POD_SECURITY,
                    "terminationGracePeriodSeconds": 60,
                    "enableServiceLinks": False,
                    **GPU_PLACEMENT,
                },
            },
        },
    }


JOB_SPEC = {
    "backoffLimit": 4,
    "podFailurePolicy": {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": "prefetch", "operator": "In", "values": [3]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    },
    "activeDeadlineSeconds": 7200,
}


def prefetch_container(image: str, command: list[str], env: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "prefetch",
        "image": image,
        "command": command,
        "env": env,
        "volumeMounts": [{"name": "model-cache", "mountPath": "/models"}, {"name": "tmp", "mountPath": "/tmp"}],
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
        "securityContext": CONTAINER_SECURITY,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def job(name: str, model: str, container: dict[str, Any], placement: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {**meta(name, "model-prefetch"), "annotations": {"modelfleet.io/prefetch-model": model}},
        "spec": {
            **JOB_SPEC,
            "template": {
                "metadata": {"labels": labels("model-prefetch")},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [container],
                    "volumes": [
                        {"name": "model-cache", "persistentVolumeClaim": {"claimName": "im-demo-cache"}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                    "securityContext": POD_SECURITY,
                    **placement,
                },
            },
        },
    }


def test_the_prefetch_jobs_in_full() -> None:
    ollama_env = [
        {"name": "MODELFLEET_MODEL", "value": "phi3:mini"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "MODELFLEET_PULL", "value": "phi3:mini"},
        {"name": "MODELFLEET_PULL_FLAGS", "value": ""},
        {"name": "OLLAMA_MODELS", "value": "/models/ollama"},
        {"name": "OLLAMA_HOST", "value": "127.0.0.1:11434"},
    ]
    ollama_command = ["/bin/sh", "-c", cache.OLLAMA_PULL_SCRIPT]
    ollama_container = prefetch_container("docker.io/ollama/ollama:0.17.4", ollama_command, ollama_env)
    # No podAffinity: the Job runs before any serving pod, and alone on its volume.
    # Pinned: a new key is a new Job, which fetches the weights again (after an operator upgrade, for every model).
    assert cache.prefetch_job_name(OLLAMA) == "im-demo-prefetch-dfc2a1bb3e"
    assert cache.build_prefetch_job(OLLAMA) == job("im-demo-prefetch-dfc2a1bb3e", "phi3:mini", ollama_container, {})
    vllm_env = [
        {"name": "MODELFLEET_MODEL", "value": "Qwen/Qwen2.5-7B-Instruct-AWQ"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/models/hf"},
    ]
    vllm_command = ["python3", "-c", cache.HF_DOWNLOAD_SCRIPT]
    vllm_container = prefetch_container("docker.io/vllm/vllm-openai:v0.32.0", vllm_command, vllm_env)
    name = "im-demo-prefetch-55e8789005"
    assert cache.build_prefetch_job(VLLM) == job(name, "Qwen/Qwen2.5-7B-Instruct-AWQ", vllm_container, GPU_PLACEMENT)


def test_the_claim_service_pdb_and_autoscalers_in_full() -> None:
    assert cache.build_cache_claim(OLLAMA) == {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": meta("im-demo-cache", "model-cache"),
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "30Gi"}}},
    }
    claim = cache.build_cache_claim(VLLM)
    assert claim is not None
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "30Gi"}},
        "storageClassName": "nfs",
    }
    assert service.build_service(OLLAMA) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta("im-demo", "model-server"),
        "spec": {
            "type": "ClusterIP",
            "selector": SELECTOR,
            "ports": [{"name": "http", "port": 11434, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    assert service.service_url(VLLM) == "http://im-demo.models.svc:8000"
    assert autoscaling.build_pdb(OLLAMA) == {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta("im-demo", "model-server"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": SELECTOR}},
    }
    behavior = {
        "scaleUp": {"stabilizationWindowSeconds": 0, "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]},
        "scaleDown": {
            "stabilizationWindowSeconds": 300,
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
        },
    }
    target = {"type": "AverageValue", "averageValue": "4"}
    assert autoscaling.build_hpa(VLLM) == {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta("im-demo", "autoscaler"),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "im-demo"},
            "minReplicas": 0,
            "maxReplicas": 5,
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {
                            "name": "modelfleet_queue_depth",
                            "selector": {"matchLabels": {"model": "demo", "namespace": "models"}},
                        },
                        "target": target,
                    },
                }
            ],
            "behavior": behavior,
        },
    }
    engine_hpa = autoscaling.build_hpa(ENGINE)
    assert engine_hpa is not None
    assert engine_hpa["spec"]["minReplicas"] == 1
    assert engine_hpa["spec"]["metrics"] == [
        {"type": "Pods", "pods": {"metric": {"name": "vllm_num_requests_waiting"}, "target": target}}
    ]
    assert engine_hpa["spec"]["behavior"] == behavior


def with_spec(context: ModelContext, **update: Any) -> ModelContext:
    return dataclasses.replace(context, spec=context.spec.model_copy(update=update))


def autoscaled(min_replicas: int, max_replicas: int, metric: str = "router", target: int = 4) -> ModelContext:
    spec = {
        "runtime": "vllm",
        "model": "m",
        "autoscaling": {
            "enabled": True,
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metric": metric,
            "targetQueueDepthPerReplica": target,
        },
    }
    return ModelContext(name="demo", namespace="models", uid="u", spec=v1alpha1.InferenceModelSpec.model_validate(spec))


def test_min_replicas_follow_the_metric_and_scale_to_zero_and_the_pdb_the_most_replicas() -> None:
    assert autoscaling.lowest_replicas(autoscaled(0, 5), scale_to_zero=True) == 0
    assert autoscaling.lowest_replicas(autoscaled(0, 5), scale_to_zero=False) == 1
    assert autoscaling.lowest_replicas(autoscaled(2, 5), scale_to_zero=True) == 2
    assert autoscaling.lowest_replicas(autoscaled(3, 5), scale_to_zero=False) == 3
    assert autoscaling.lowest_replicas(autoscaled(0, 5, metric="engine"), scale_to_zero=True) == 1
    assert autoscaling.lowest_replicas(autoscaled(2, 5, metric="engine"), scale_to_zero=True) == 2
    hpa = autoscaling.build_hpa(autoscaled(1, 9, target=7))
    assert hpa is not None
    assert hpa["spec"]["maxReplicas"] == 9
    assert hpa["spec"]["metrics"][0]["external"]["target"] == {"type": "AverageValue", "averageValue": "7"}
    # The PDB follows the most replicas the model may have: the HPA's maximum, or spec.replicas.
    assert autoscaling.build_pdb(autoscaled(1, 1)) is None
    assert autoscaling.build_pdb(autoscaled(1, 2)) is not None
    assert autoscaling.build_pdb(with_spec(OLLAMA, replicas=1)) is None
    assert autoscaling.build_pdb(with_spec(OLLAMA, replicas=2)) is not None
    assert workload.max_replicas(autoscaled(1, 6)) == 6
    assert workload.max_replicas(with_spec(OLLAMA, replicas=4)) == 4


def ollama_from(source: dict[str, Any], model: str = "gemma3:270m") -> ModelContext:
    spec = {"runtime": "ollama", "model": model, "source": source}
    return ModelContext(name="demo", namespace="models", uid="u", spec=v1alpha1.InferenceModelSpec.model_validate(spec))


def env_of(manifest: dict[str, Any] | None) -> dict[str, Any]:
    assert manifest is not None
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    return {var["name"]: var.get("value", var.get("valueFrom")) for var in container["env"]}


def test_a_private_registry_is_pulled_from_with_its_ca_or_insecurely() -> None:
    plain = ollama_from({"registry": "registry.ai.svc:5000"})
    assert cache.ollama_pull_reference(plain) == "registry.ai.svc:5000/library/gemma3:270m"
    assert cache.ollama_pull_reference(ollama_from({"registry": "r:5000"}, "team/m:1")) == "r:5000/team/m:1"
    assert cache.ollama_pull_reference(OLLAMA) == "phi3:mini"
    assert env_of(cache.build_prefetch_job(plain))["MODELFLEET_PULL_FLAGS"] == ""
    insecure = cache.build_prefetch_job(ollama_from({"registry": "r:5000", "insecure": True}))
    assert env_of(insecure)["MODELFLEET_PULL_FLAGS"] == "--insecure"
    assert env_of(insecure)["MODELFLEET_PULL"] == "r:5000/library/gemma3:270m"
    assert "SSL_CERT_FILE" not in env_of(insecure)
    with_ca = cache.build_prefetch_job(ollama_from({"registry": "r", "caConfigMapRef": {"name": "ca", "key": "pem"}}))
    assert with_ca is not None
    assert env_of(with_ca)["SSL_CERT_FILE"] == "/etc/modelfleet/registry-ca/ca.crt"
    pod = with_ca["spec"]["template"]["spec"]
    assert pod["containers"][0]["volumeMounts"][-1] == {
        "name": "registry-ca",
        "mountPath": "/etc/modelfleet/registry-ca",
        "readOnly": True,
    }
    assert pod["volumes"][-1] == {
        "name": "registry-ca",
        "configMap": {"name": "ca", "items": [{"key": "pem", "path": "ca.crt"}]},
    }


def test_a_hugging_face_token_reaches_the_vllm_prefetch_from_its_secret() -> None:
    spec = VLLM.spec.model_copy(
        update={"cache": v1alpha1.Cache.model_validate({"hfTokenSecretRef": {"name": "hf", "key": "token"}})}
    )
    env = env_of(cache.build_prefetch_job(dataclasses.replace(VLLM, spec=spec)))
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert "HF_TOKEN" not in env_of(cache.build_prefetch_job(VLLM))
    # A path inside the volume: the user put the weights there, nothing to fetch.  Ollama names are no paths.
    assert cache.build_prefetch_job(with_spec(VLLM, model="/models/weights")) is None
    assert cache.build_prefetch_job(with_spec(OLLAMA, model="/x")) is not None


@pytest.mark.parametrize(("access_mode", "pinned"), [("ReadWriteOnce", True), ("ReadWriteOncePod", True),
                                                     ("ReadWriteMany", False)])  # fmt: skip
def test_a_prefetch_job_goes_to_the_node_that_mounts_a_single_node_volume(access_mode: str, pinned: bool) -> None:
    spec = OLLAMA.spec.model_copy(update={"cache": v1alpha1.Cache(access_mode=access_mode)})
    context = dataclasses.replace(OLLAMA, spec=spec, volume_node="node-7")
    pod = cache.build_prefetch_job(context)["spec"]["template"]["spec"]  # type: ignore[index]
    node_affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-7"]}]}
                ]
            }
        }
    }
    assert pod.get("affinity") == (node_affinity if pinned else None)
    unobserved = cache.build_prefetch_job(dataclasses.replace(context, volume_node=None))
    assert "affinity" not in unobserved["spec"]["template"]["spec"]  # type: ignore[index]


def test_user_scheduling_reaches_the_serving_pods_and_the_prefetch_job() -> None:
    user_affinity: dict[str, Any] = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    scheduling = v1alpha1.Scheduling.model_validate(
        {
            "nodeSelector": {"pool": "llm"},
            "affinity": user_affinity,
            "priorityClassName": "high",
            "runtimeClassName": "nvidia",
        }
    )
    context = with_spec(make_context("ollama", 1, "fixed-1", "rwx"), scheduling=scheduling)
    pod = workload.build_deployment(context)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "pool": "llm"}
    assert pod["affinity"] == user_affinity
    assert (pod["priorityClassName"], pod["runtimeClassName"]) == ("high", "nvidia")
    colocated = workload.build_deployment(with_spec(make_context("ollama", 0, "fixed-1", "rwo"), scheduling=scheduling))
    assert set(colocated["spec"]["template"]["spec"]["affinity"]) == {"nodeAffinity", "podAffinity"}
    job_pod = cache.build_prefetch_job(context)["spec"]["template"]["spec"]  # type: ignore[index]
    assert job_pod["nodeSelector"] == pod["nodeSelector"]
    assert job_pod["priorityClassName"] == "high"
    assert "runtimeClassName" not in job_pod, "the Job needs no GPU runtime"
    assert "affinity" not in job_pod
    # Another GPU resource has no well-known node label: only its toleration.
    amd = with_spec(context, resources=v1alpha1.Resources(gpu=1, gpu_resource="amd.com/gpu"), scheduling=None)
    amd_pod = workload.build_deployment(amd)["spec"]["template"]["spec"]
    assert "nodeSelector" not in amd_pod
    assert amd_pod["tolerations"] == [{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_resources_say_only_what_the_model_asks_for() -> None:
    assert workload.resource_requirements(with_spec(OLLAMA, resources=v1alpha1.Resources(gpu=0))) == {}
    only_gpu = with_spec(OLLAMA, resources=v1alpha1.Resources(gpu=3))
    assert workload.resource_requirements(only_gpu) == {"limits": {"nvidia.com/gpu": "3"}}
    only_cpu = with_spec(OLLAMA, resources=v1alpha1.Resources(gpu=0, cpu="500m"))
    assert workload.resource_requirements(only_cpu) == {"requests": {"cpu": "500m"}}


def test_vllm_answers_to_one_name_when_model_and_name_agree_and_keeps_the_users_tensor_parallelism() -> None:
    same = dataclasses.replace(with_spec(VLLM, model="demo"), name="demo")
    args = workload.build_deployment(same)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:6] == ["--model", "demo", "--served-model-name", "demo", "--port", "8000"]
    engine = v1alpha1.Engine(args=["--tensor-parallel-size", "1"])
    user_tp = workload.build_deployment(with_spec(VLLM, engine=engine))["spec"]["template"]["spec"]
    assert user_tp["containers"][0]["args"].count("--tensor-parallel-size") == 1
    assert user_tp["containers"][0]["args"][-2:] == ["--tensor-parallel-size", "1"]
    one_gpu = workload.build_deployment(with_spec(VLLM, engine=None, resources=v1alpha1.Resources(gpu=1)))
    assert "--tensor-parallel-size" not in one_gpu["spec"]["template"]["spec"]["containers"][0]["args"]


def test_the_prefetch_key_changes_with_what_is_fetched_and_where() -> None:
    key = cache.prefetch_key(OLLAMA)
    assert len(key) == 10
    assert cache.prefetch_key(dataclasses.replace(OLLAMA, cache_claim_uid="claim-2")) != key
    assert cache.prefetch_key(with_spec(OLLAMA, image="registry.local/ollama:1")) != key
    assert cache.prefetch_key(with_spec(OLLAMA, model="other")) != key
    assert cache.prefetch_key(ollama_from({"registry": "r"}, "phi3:mini")) != cache.prefetch_key(
        ollama_from({"registry": "s"}, "phi3:mini")
    )
    assert cache.prefetch_key(dataclasses.replace(OLLAMA, cache_claim_uid="")) == key, "no UID observed: the same"


def test_a_long_model_name_fills_the_job_name_to_63_characters_with_a_digest() -> None:
    name = "a" * 40 + "-" + "b" * 19
    context = ModelContext(name=name, namespace="models", uid="u", spec=OLLAMA.spec)
    job_name = cache.prefetch_job_name(context)
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    suffix = f"-{digest}-prefetch-{cache.prefetch_key(context)}"
    assert job_name.endswith(suffix)
    assert job_name == "im-" + name[: 63 - 3 - len(suffix)] + suffix
    assert len(job_name) == 63
    # A cut that ends on "-" drops it: no "--" in the name.
    cut = "a" * (63 - 3 - len(suffix) - 1) + "-" + "b" * 30
    dashed = cache.prefetch_job_name(ModelContext(name=cut, namespace="models", uid="u", spec=OLLAMA.spec))
    assert "--" not in dashed
    assert dashed.startswith("im-" + "a" * (63 - 3 - len(suffix) - 1) + "-")


def test_context_defaults_and_the_names_children_share() -> None:
    assert common.child_name(OLLAMA) == "im-demo"
    assert common.child_name(OLLAMA, "cache") == "im-demo-cache"
    assert OLLAMA.cache_claim_name == "im-demo-cache"
    assert ENGINE.cache_claim_name == "shared-weights"
    assert (OLLAMA.served_model, VLLM.served_model) == ("phi3:mini", "demo")
    assert common.RuntimeImages() == common.RuntimeImages(
        ollama="docker.io/ollama/ollama:0.17.4", vllm="docker.io/vllm/vllm-openai:v0.32.0"
    )
    assert workload.serving_port(OLLAMA) == 11434
    assert workload.serving_port(VLLM) == 8000


def test_a_network_policy_in_full() -> None:
    policy = networkpolicy.build_network_policy(dataclasses.replace(OLLAMA, network=NetworkPeers()))
    release = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "modelfleet-system"}}}
    assert policy == {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta("im-demo", "model-server"),
        "spec": {
            "podSelector": {
                "matchLabels": {"modelfleet.io/model": "demo", "app.kubernetes.io/managed-by": "modelfleet-operator"}
            },
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        release
                        | {
                            "podSelector": {
                                "matchLabels": {
                                    "app.kubernetes.io/name": "modelfleet",
                                    "app.kubernetes.io/component": "router",
                                }
                            }
                        },
                        release
                        | {
                            "podSelector": {
                                "matchLabels": {
                                    "app.kubernetes.io/name": "modelfleet",
                                    "app.kubernetes.io/component": "operator",
                                }
                            }
                        },
                    ],
                    "ports": [{"protocol": "TCP", "port": 11434}],
                }
            ],
        },
    }


def test_a_model_name_that_just_fits_keeps_its_plain_job_name() -> None:
    name = "a" * 40  # im- + 40 + -prefetch- + a 10-character key: 63
    context = ModelContext(name=name, namespace="models", uid="u", spec=OLLAMA.spec)
    assert cache.prefetch_job_name(context) == f"im-{name}-prefetch-{cache.prefetch_key(context)}"


def test_an_engine_variable_from_a_secret_keeps_its_kubernetes_field_name() -> None:
    env_var = v1alpha1.EnvVar.model_validate(
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
    )
    context = with_spec(OLLAMA, engine=v1alpha1.Engine(env=[env_var]))
    env = workload.build_deployment(context)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env[-1] == {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
