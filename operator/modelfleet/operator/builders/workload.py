"""The Deployment that serves a managed model on Ollama or vLLM."""

from __future__ import annotations

from typing import Any

from modelfleet.api.naming import MODEL_SERVER, PORT_NAME, SERVED_MODEL_ANNOTATION, WARMED_UP_CONDITION
from modelfleet.operator.builders.common import (
    Manifest,
    ModelContext,
    child_name,
    container_security_context,
    labels,
    metadata,
    pod_security_context,
    selector_labels,
)

MODELS_MOUNT = "/models"
HOME = "/home/modelfleet"
# A pod counts as Ready only once WARMED_UP_CONDITION is True: the operator sets it after the pod has
# answered a warm-up generation, so the router never sends a request to a pod still loading weights.
# SERVED_MODEL_ANNOTATION, on the pod template, is the model name a pod answers to: what the warm-up
# asks for, and what changes the template (and so rolls the pods) when spec.model changes.
# How long a stopping pod keeps serving before the engine gets SIGTERM (within its grace period).
PRE_STOP_SECONDS = 10
OLLAMA_PORT = 11434
VLLM_PORT = 8000
# KV cache of a vLLM replica on CPU, in GiB (VLLM_CPU_KVCACHE_SPACE; engine.env may set another).
CPU_KV_CACHE_GIB = 1
# GPU device plugins taint and label GPU nodes like this (NVIDIA GPU operator / GKE / EKS).
GPU_PRESENT_LABELS = {"nvidia.com/gpu": {"nvidia.com/gpu.present": "true"}}


def serving_port(context: ModelContext) -> int:
    return OLLAMA_PORT if context.runtime == "ollama" else VLLM_PORT


def ollama_container_settings(context: ModelContext) -> tuple[list[str], list[Manifest], str]:
    env = [
        {"name": "OLLAMA_HOST", "value": f"0.0.0.0:{OLLAMA_PORT}"},
        {"name": "OLLAMA_MODELS", "value": f"{MODELS_MOUNT}/ollama"},
        # Keep the model in memory: a reload costs seconds of GPU time on the next request.
        {"name": "OLLAMA_KEEP_ALIVE", "value": "-1"},
        # The router admits this many requests per replica; Ollama should run them concurrently.
        {"name": "OLLAMA_NUM_PARALLEL", "value": str(context.serving.max_in_flight_per_replica)},
        # The prefetch Job filled the volume; the server must never prune or re-pull weights.
        {"name": "OLLAMA_NOPRUNE", "value": "1"},
        {"name": "HOME", "value": HOME},
    ]
    return ["serve"], env, "/api/version"


def vllm_container_settings(context: ModelContext) -> tuple[list[str], list[Manifest], str]:
    # Two names: spec.model, and the InferenceModel's name, which the router sends (it stays the same
    # across a change of spec.model, so old and new pods both answer to it during a rollout).
    names = (
        [context.spec.model]
        if context.served_model == context.spec.model
        else [context.spec.model, context.served_model]
    )
    args = ["--model", context.spec.model, "--served-model-name", *names, "--port", str(VLLM_PORT)]
    user_args = context.spec.engine.args if context.spec.engine and context.spec.engine.args else []
    if context.resources.gpu > 1 and "--tensor-parallel-size" not in user_args:
        args += ["--tensor-parallel-size", str(context.resources.gpu)]
    args += ["--max-num-seqs", str(context.serving.max_in_flight_per_replica)]
    adapters = context.spec.adapters or []
    if adapters:
        # Each adapter answers to its own name; vLLM finds a repository id in the volume's hub cache
        # (HF_HUB_OFFLINE), where the prefetch Job put it. Every replica loads every adapter.
        args += ["--enable-lora", "--max-loras", str(len(adapters)), "--lora-modules"]
        args += [f"{adapter.name}={adapter.model}" for adapter in adapters]
    cache = f"{HOME}/.cache"
    device_env: list[Manifest] = []
    if not context.uses_gpu:
        # vLLM's CPU build (the vllm-cpu image) keeps its KV cache in this many GiB of the pod's memory;
        # a bounded, stated amount, so a replica's memory is known. Not OMP_NUM_THREADS: vLLM binds one
        # OpenMP thread per core itself, and a fixed count halved decoding speed on two cores.
        device_env = [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": str(CPU_KV_CACHE_GIB)}]
    env = [
        {"name": "HF_HOME", "value": f"{MODELS_MOUNT}/hf"},
        # Weights come from the cache volume only: a restart must never download them again.
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "HOME", "value": HOME},
        # UID 1000 has no passwd entry in the vLLM image; getpass.getuser() (torch, triton) then
        # fails unless USER or LOGNAME names the user.
        {"name": "USER", "value": "modelfleet"},
        {"name": "LOGNAME", "value": "modelfleet"},
        # The model volume is mounted read-only, and HF_HOME is on it: everything the engine writes
        # at run time goes to the writable home instead (remote code, compiled kernels, vLLM's cache).
        {"name": "HF_MODULES_CACHE", "value": f"{cache}/huggingface/modules"},
        {"name": "XDG_CACHE_HOME", "value": cache},
        {"name": "TRITON_CACHE_DIR", "value": f"{cache}/triton"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{cache}/torchinductor"},
        {"name": "VLLM_CACHE_ROOT", "value": f"{cache}/vllm"},
        {"name": "TORCH_HOME", "value": f"{cache}/torch"},
        *device_env,
    ]
    return args + list(user_args), env, "/health"


def resource_requirements(context: ModelContext) -> Manifest:
    resources = context.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if resources.cpu is not None:
        requests["cpu"] = str(resources.cpu)
    if resources.memory is not None:
        requests["memory"] = limits["memory"] = str(resources.memory)
    if resources.gpu > 0:
        # Extended resources are requested through limits; the API server copies them to requests.
        limits[resources.gpu_resource] = str(resources.gpu)
    out: Manifest = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def scheduling(context: ModelContext) -> Manifest:
    user = context.spec.scheduling
    pod: Manifest = {}
    node_selector: dict[str, str] = {}
    tolerations: list[Manifest] = []
    if context.uses_gpu:
        node_selector.update(GPU_PRESENT_LABELS.get(context.resources.gpu_resource, {}))
        tolerations.append({"key": context.resources.gpu_resource, "operator": "Exists", "effect": "NoSchedule"})
    if user is not None:
        node_selector.update(user.node_selector or {})
        tolerations.extend(t.model_dump(by_alias=True, exclude_none=True) for t in user.tolerations or [])
    if node_selector:
        pod["nodeSelector"] = node_selector
    if tolerations:
        pod["tolerations"] = tolerations
    affinity = dict(user.affinity) if user is not None and user.affinity else {}
    if needs_colocation(context):
        # A ReadWriteOnce volume mounts on one node at a time; every replica must run there.
        affinity["podAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": selector_labels(context)}, "topologyKey": "kubernetes.io/hostname"}
            ]
        }
    if affinity:
        pod["affinity"] = affinity
    if user is not None and user.priority_class_name:
        pod["priorityClassName"] = user.priority_class_name
    if user is not None and user.runtime_class_name:
        pod["runtimeClassName"] = user.runtime_class_name
    return pod


def max_replicas(context: ModelContext) -> int:
    return context.autoscaling.max_replicas if context.autoscaled else context.spec.replicas


def needs_colocation(context: ModelContext) -> bool:
    """Whether every replica must run on the node that mounts the volume.

    Also for a single replica: the rule is part of the pod template, and a template that changed
    with the replica count would replace the running pod (and warm a new one up) on every scale-up.
    A lone pod matches its own affinity term, so the scheduler places it anywhere.
    """
    return context.cache.access_mode == "ReadWriteOnce"


def rollout_strategy(context: ModelContext) -> Manifest:
    if context.uses_gpu:
        # Replace pods one at a time in place: a surge pod would need a GPU that may not exist.
        return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def build_deployment(context: ModelContext) -> Manifest:
    if context.runtime == "ollama":
        args, env, health_path = ollama_container_settings(context)
    else:
        args, env, health_path = vllm_container_settings(context)
    if context.spec.engine and context.spec.engine.env:
        # A variable the user sets replaces ours of the same name: server-side apply merges env by
        # name and refuses a list that names one variable twice.
        user_env = [var.model_dump(by_alias=True, exclude_none=True) for var in context.spec.engine.env]
        overridden = {var["name"] for var in user_env}
        env = [var for var in env if var["name"] not in overridden] + user_env
    port = serving_port(context)

    def probe(period: int, failures: int) -> Manifest:
        # Health endpoints answer without running the model, so probes never cost a generation.
        return {
            "httpGet": {"path": health_path, "port": PORT_NAME},
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": failures,
        }

    container: Manifest = {
        "name": context.runtime,
        "image": context.image,
        "args": args,
        "env": env,
        "ports": [{"name": PORT_NAME, "containerPort": port, "protocol": "TCP"}],
        "resources": resource_requirements(context),
        # The engine's health endpoint answers before the model is loaded (Ollama loads on the first
        # request): readiness also waits for the warm-up condition (readinessGates below).
        # Loading tens of GB of weights takes minutes: up to 30 minutes before liveness applies.
        "startupProbe": probe(period=10, failures=180),
        "readinessProbe": probe(period=5, failures=3),
        "livenessProbe": probe(period=20, failures=3),
        # A stopping pod keeps serving for a while: the router and kube-proxy learn from its EndpointSlice
        # that it is going, and stop sending it requests, before the engine stops listening. The sleep
        # action needs no shell in the image (Kubernetes 1.30+).
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}},
        "volumeMounts": [
            {"name": "model-cache", "mountPath": MODELS_MOUNT, "readOnly": context.runtime == "vllm"},
            {"name": "home", "mountPath": HOME},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": container_security_context(),
    }
    volumes: list[Manifest] = [
        {"name": "model-cache", "persistentVolumeClaim": {"claimName": context.cache_claim_name}},
        {"name": "home", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if context.runtime == "vllm":
        # Tensor-parallel workers exchange activations through shared memory.
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})

    pod_spec: Manifest = {
        "containers": [container],
        "readinessGates": [{"conditionType": WARMED_UP_CONDITION}],
        "volumes": volumes,
        "securityContext": pod_security_context(),
        # Streams in flight get time to finish when a pod is replaced.
        "terminationGracePeriodSeconds": 60,
        "enableServiceLinks": False,
        **scheduling(context),
    }
    spec: Manifest = {
        "selector": {"matchLabels": selector_labels(context)},
        "strategy": rollout_strategy(context),
        "template": {
            "metadata": {
                "labels": labels(context, MODEL_SERVER),
                "annotations": {SERVED_MODEL_ANNOTATION: context.served_model},
            },
            "spec": pod_spec,
        },
    }
    if not context.autoscaled:
        # Left out entirely under autoscaling, so server-side apply never takes replicas from the HPA.
        # When a load ends an unload, leaving it out again gives up the operator's ownership of the
        # field, which then returns to the Deployment's default of 1, and the HPA takes it from there.
        spec["replicas"] = context.spec.replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(context, child_name(context), MODEL_SERVER),
        "spec": spec,
    }
