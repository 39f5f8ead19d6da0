"""The weights cache: a PersistentVolumeClaim, and the Job that fills it once."""

from __future__ import annotations

import hashlib

from modelfleet.api.naming import MODEL_PREFETCH, PREFETCH_MODEL_ANNOTATION, child_base_name
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
    """Changes exactly when the weights to fetch or the volume to fill change.

    So a new model, source or image gets a new Job, and so does a new volume: the claim's UID is part of
    the key, so a claim deleted and created again under the same name, or another existingClaim, is
    filled again. A completed Job therefore means "the weights are on this volume".
    """
    source = context.spec.source
    origin = source.model_dump_json() if source is not None else ""
    parts = [context.runtime, context.spec.model, origin, context.image, context.cache_claim_uid or ""]
    if context.spec.adapters:
        # Only when there are adapters, so that the key of every other model stays what it was.
        parts.append(",".join(sorted(adapter.model for adapter in context.spec.adapters)))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


# A Job's name is also a label value on its pods, so at most 63 characters.
MAX_JOB_NAME_LENGTH = 63


def prefetch_job_name(context: ModelContext) -> str:
    """The Job's name, im-<model>-prefetch-<key>; a long model name is shortened and made unique by a digest of it."""
    suffix = f"prefetch-{prefetch_key(context)}"
    name = child_name(context, suffix)
    if len(name) <= MAX_JOB_NAME_LENGTH:
        return name
    digest = hashlib.sha256(context.name.encode()).hexdigest()[:6]
    room = MAX_JOB_NAME_LENGTH - len(child_base_name(f"-{digest}-{suffix}"))
    return child_base_name(f"{context.name[:room].rstrip('-')}-{digest}-{suffix}")


# Exit code of a pull that cannot succeed on retry (no such model, or a name Ollama refuses): the Job's pod
# failure policy fails the Job at once instead of retrying, and the message says what to fix.
MODEL_NOT_FOUND_EXIT_CODE = 3

# Pulls $MODELFLEET_PULL (the model, or <registry>/<model>) with a private Ollama server on loopback,
# then names it $MODELFLEET_MODEL. The last line written to the termination log is what the operator
# reports when the pull fails.
OLLAMA_PULL_SCRIPT = f"""\
set -u
report() {{ printf '%s\\n' "$1" >/dev/termination-log; echo "$1" >&2; }}
ollama serve >/tmp/ollama.log 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
tries=0
until ollama list >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -ge 120 ]; then cat /tmp/ollama.log >&2; report "the Ollama server in the Job did not start"; exit 1; fi
  sleep 1
done
if ! ollama pull $MODELFLEET_PULL_FLAGS "$MODELFLEET_PULL" 2>/tmp/pull.err; then
  cat /tmp/pull.err >&2
  reason=$(tr '\\r' '\\n' </tmp/pull.err | grep -i 'error' | tail -n 1)
  case "$reason" in
    *"file does not exist"*|*"not found"*|*"manifest unknown"*|*"name unknown"*)
      report "the registry has no model $MODELFLEET_PULL ($reason): check spec.model and spec.source.registry"
      exit {MODEL_NOT_FOUND_EXIT_CODE};;
    *"invalid model name"*)
      report "Ollama does not accept the model name $MODELFLEET_PULL ($reason): check spec.model"
      exit {MODEL_NOT_FOUND_EXIT_CODE};;
  esac
  report "pulling $MODELFLEET_PULL failed: ${{reason:-see the Job's log}}"
  exit 1
fi
if [ "$MODELFLEET_PULL" != "$MODELFLEET_MODEL" ]; then
  # The blobs are shared: only the manifest is copied, under the name clients and servers use.
  if ! ollama cp "$MODELFLEET_PULL" "$MODELFLEET_MODEL"; then
    report "naming $MODELFLEET_PULL as $MODELFLEET_MODEL failed"; exit 1
  fi
  ollama rm "$MODELFLEET_PULL" >/dev/null || true
fi
ollama list
"""

REGISTRY_CA_PATH = "/etc/modelfleet/registry-ca/ca.crt"


def ollama_pull_reference(context: ModelContext) -> str:
    """What the Job pulls: the model itself, or the same name in the private registry."""
    source = context.spec.source
    if source is None or source.registry is None:
        return context.spec.model
    # Ollama reads host/namespace/model:tag; a bare name such as gemma3:270m is in namespace library,
    # as on ollama.com, and without it Ollama refuses the reference.
    model = context.spec.model if "/" in context.spec.model else f"library/{context.spec.model}"
    return f"{source.registry}/{model}" if source.registry else context.spec.model


# Downloads the repository $MODELFLEET_MODEL, and the LoRA adapters' repositories in
# $MODELFLEET_ADAPTERS (one per line), from $HF_ENDPOINT (the public Hub when unset) into $HF_HOME/hub,
# where the serving pods read them with HF_HUB_OFFLINE=1. Files already there are not fetched again.
# A repository that is not there (the hub answers the same for one the token may not read) fails the
# Job at once; the last line of the termination log is what the operator reports.
HF_DOWNLOAD_SCRIPT = f"""\
import os, sys
from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

hub = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
repositories = [os.environ["MODELFLEET_MODEL"], *os.environ.get("MODELFLEET_ADAPTERS", "").split()]


def report(message, code):
    with open("/dev/termination-log", "w") as log:
        log.write(message + "\\n")
    print(message, file=sys.stderr)
    sys.exit(code)


for model in repositories:
    if model.startswith("/"):
        continue  # a path in the volume: put there by the user
    try:
        path = snapshot_download(repo_id=model, token=os.environ.get("HF_TOKEN") or None)
    except GatedRepoError:
        report(
            f"{{model}} on {{hub}} is gated: set spec.cache.hfTokenSecretRef to a token that may read it",
            {MODEL_NOT_FOUND_EXIT_CODE},
        )
    except (RepositoryNotFoundError, RevisionNotFoundError):
        report(
            f"{{hub}} has no model {{model}}, or the token may not read it: check spec.model, spec.adapters, "
            "spec.source.huggingFaceEndpoint and spec.cache.hfTokenSecretRef",
            {MODEL_NOT_FOUND_EXIT_CODE},
        )
    except Exception as exc:
        reason = f"{{type(exc).__name__}}: {{str(exc).splitlines()[0][:300]}}"
        report(f"downloading {{model}} from {{hub}} failed: {{reason}}", 1)
    print("downloaded", model, "to", path)
"""


def build_prefetch_job(context: ModelContext) -> Manifest | None:
    """A Job that downloads the weights into the cache volume, or None when there is nothing to fetch."""
    if context.runtime == "vllm" and context.spec.model.startswith("/"):
        return None  # a path inside the volume: the user put the weights there
    env: list[Manifest] = [{"name": "MODELFLEET_MODEL", "value": context.spec.model}, {"name": "HOME", "value": "/tmp"}]
    mounts: list[Manifest] = [
        {"name": "model-cache", "mountPath": MODELS_MOUNT},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[Manifest] = [
        {"name": "model-cache", "persistentVolumeClaim": {"claimName": context.cache_claim_name}},
        {"name": "tmp", "emptyDir": {}},
    ]
    source = context.spec.source
    if context.runtime == "ollama":
        command = ["/bin/sh", "-c", OLLAMA_PULL_SCRIPT]
        env += [
            {"name": "MODELFLEET_PULL", "value": ollama_pull_reference(context)},
            {"name": "MODELFLEET_PULL_FLAGS", "value": "--insecure" if source is not None and source.insecure else ""},
            {"name": "OLLAMA_MODELS", "value": f"{MODELS_MOUNT}/ollama"},
            {"name": "OLLAMA_HOST", "value": "127.0.0.1:11434"},
        ]
    else:
        command = ["python3", "-c", HF_DOWNLOAD_SCRIPT]
        env.append({"name": "HF_HOME", "value": f"{MODELS_MOUNT}/hf"})
        if context.spec.adapters:
            env.append({"name": "MODELFLEET_ADAPTERS", "value": "\n".join(a.model for a in context.spec.adapters)})
        if source is not None and source.hugging_face_endpoint:
            env.append({"name": "HF_ENDPOINT", "value": source.hugging_face_endpoint.rstrip("/")})
        token = context.cache.hf_token_secret_ref
        if token is not None:
            env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    if source is not None and source.ca_config_map_ref is not None:
        ca = source.ca_config_map_ref
        # Go (Ollama) and Python's ssl (huggingface_hub) read SSL_CERT_FILE: just the source's CA.
        env.append({"name": "SSL_CERT_FILE", "value": REGISTRY_CA_PATH})
        mounts.append({"name": "registry-ca", "mountPath": REGISTRY_CA_PATH.rsplit("/", 1)[0], "readOnly": True})
        volumes.append(
            {"name": "registry-ca", "configMap": {"name": ca.name, "items": [{"key": ca.key, "path": "ca.crt"}]}}
        )
    # Same placement as the serving pods (without the GPU): a ReadWriteOnce volume stays on the node
    # that first mounts it, and that must be a node the model can run on.
    placement = scheduling(context)
    placement.pop("affinity", None)
    if context.volume_node is not None and context.cache.access_mode in ("ReadWriteOnce", "ReadWriteOncePod"):
        # The serving pods mount the volume on this node, and only this node can mount it too.
        placement["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [context.volume_node]}]}
                    ]
                }
            }
        }
    pod_spec: Manifest = {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "prefetch",
                "image": context.image,
                "command": command,
                "env": env,
                "volumeMounts": mounts,
                "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
                "securityContext": container_security_context(),
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": volumes,
        "securityContext": pod_security_context(),
        **{k: v for k, v in placement.items() if k in ("nodeSelector", "tolerations", "priorityClassName", "affinity")},
    }
    job_metadata = metadata(context, prefetch_job_name(context), MODEL_PREFETCH)
    job_metadata["annotations"] = {PREFETCH_MODEL_ANNOTATION: context.spec.model}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job_metadata,
        "spec": {
            "backoffLimit": PREFETCH_RETRIES,
            # A model the registry does not have fails the Job at once: retrying cannot help.
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "prefetch",
                            "operator": "In",
                            "values": [MODEL_NOT_FOUND_EXIT_CODE],
                        },
                    },
                    # A node drained or a pod preempted is not the download's fault: not counted.
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "activeDeadlineSeconds": PREFETCH_TIMEOUT_SECONDS,
            "template": {"metadata": {"labels": job_metadata["labels"]}, "spec": pod_spec},
        },
    }
