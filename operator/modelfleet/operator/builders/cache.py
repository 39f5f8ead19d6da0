"""The weights cache: a PersistentVolumeClaim, and the Job that fills it once."""

from __future__ import annotations

import hashlib

from modelfleet.operator.builders.common import (
    Manifest,
    ModelContext,
    child_name,
    container_security_context,
    metadata,
    pod_security_context,
)
from modelfleet.operator.builders.workload import MODELS_MOUNT, scheduling

PREFETCH_TIMEOUT_SECONDS = 2 * 3600
PREFETCH_RETRIES = 4


def build_cache_claim(context: ModelContext) -> Manifest | None:
    """The claim, or None when the user brings an existing one."""
    cache = context.cache
    if cache.existing_claim:
        return None
    spec: Manifest = {"accessModes": [cache.access_mode], "resources": {"requests": {"storage": str(cache.size)}}}
    if cache.storage_class_name:
        spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(context, context.cache_claim_name, "model-cache"),
        "spec": spec,
    }


def prefetch_key(context: ModelContext) -> str:
    """Changes exactly when the weights to fetch change, so a new model gets a new Job."""
    return hashlib.sha256(f"{context.runtime}\n{context.spec.model}\n{context.image}".encode()).hexdigest()[:10]


# A Job's name is also a label value on its pods, so at most 63 characters.
MAX_JOB_NAME_LENGTH = 63


def prefetch_job_name(context: ModelContext) -> str:
    """im-<model>-prefetch-<key>; a long model name is shortened and made unique by a digest of it."""
    suffix = f"prefetch-{prefetch_key(context)}"
    name = child_name(context, suffix)
    if len(name) <= MAX_JOB_NAME_LENGTH:
        return name
    digest = hashlib.sha256(context.name.encode()).hexdigest()[:6]
    room = MAX_JOB_NAME_LENGTH - len(f"im--{digest}-{suffix}")
    return f"im-{context.name[:room].rstrip('-')}-{digest}-{suffix}"


OLLAMA_PULL_SCRIPT = """\
set -eu
ollama serve >/tmp/ollama.log 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
tries=0
until ollama list >/dev/null 2>&1; do
  tries=$((tries + 1)); [ "$tries" -lt 120 ] || { cat /tmp/ollama.log; exit 1; }
  sleep 1
done
ollama pull "$MODELFLEET_MODEL"
"""

HF_DOWNLOAD_SCRIPT = """\
import os
from huggingface_hub import snapshot_download
path = snapshot_download(repo_id=os.environ["MODELFLEET_MODEL"], token=os.environ.get("HF_TOKEN") or None)
print("downloaded to", path)
"""


def build_prefetch_job(context: ModelContext) -> Manifest | None:
    """A Job that downloads the weights into the cache volume, or None when there is nothing to fetch."""
    if context.runtime == "vllm" and context.spec.model.startswith("/"):
        return None  # a path inside the volume: the user put the weights there
    env: list[Manifest] = [{"name": "MODELFLEET_MODEL", "value": context.spec.model}, {"name": "HOME", "value": "/tmp"}]
    if context.runtime == "ollama":
        command = ["/bin/sh", "-c", OLLAMA_PULL_SCRIPT]
        env += [
            {"name": "OLLAMA_MODELS", "value": f"{MODELS_MOUNT}/ollama"},
            {"name": "OLLAMA_HOST", "value": "127.0.0.1:11434"},
        ]
    else:
        command = ["python3", "-c", HF_DOWNLOAD_SCRIPT]
        env.append({"name": "HF_HOME", "value": f"{MODELS_MOUNT}/hf"})
        token = context.cache.hf_token_secret_ref
        if token is not None:
            env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    # Same placement as the serving pods (without the GPU): a ReadWriteOnce volume stays on the node
    # that first mounts it, and that must be a node the model can run on.
    placement = scheduling(context)
    placement.pop("affinity", None)
    pod_spec: Manifest = {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "prefetch",
                "image": context.image,
                "command": command,
                "env": env,
                "volumeMounts": [
                    {"name": "model-cache", "mountPath": MODELS_MOUNT},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
                "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
                "securityContext": container_security_context(),
            }
        ],
        "volumes": [
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": context.cache_claim_name}},
            {"name": "tmp", "emptyDir": {}},
        ],
        "securityContext": pod_security_context(),
        **{k: v for k, v in placement.items() if k in ("nodeSelector", "tolerations", "priorityClassName")},
    }
    job_metadata = metadata(context, prefetch_job_name(context), "model-prefetch")
    job_metadata["annotations"] = {"modelfleet.io/prefetch-model": context.spec.model}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job_metadata,
        "spec": {
            "backoffLimit": PREFETCH_RETRIES,
            "activeDeadlineSeconds": PREFETCH_TIMEOUT_SECONDS,
            "template": {"metadata": {"labels": job_metadata["labels"]}, "spec": pod_spec},
        },
    }
