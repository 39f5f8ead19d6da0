"""One reconcile of one InferenceModel: read spec, build desired children, apply, observe, compute status.

Level-based: it derives everything from the current spec and the cluster as it is now, so running
it twice, concurrently or after a crash gives the same result.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from modelfleet.api import v1alpha1
from modelfleet.api.naming import COMPONENT_LABEL, MODEL_LABEL, MODEL_PREFETCH, SERVED_MODEL_ANNOTATION
from modelfleet.operator.builders import autoscaling, cache, networkpolicy, service, workload
from modelfleet.operator.builders.common import (
    ModelContext,
    NetworkPeers,
    RuntimeImages,
    child_name,
    selector_labels,
)
from modelfleet.operator.kube import Kube, Manifest
from modelfleet.operator.status import (
    ConditionState,
    Observed,
    conditions_for,
    merge_conditions,
    phase_for,
    phase_timings,
    transitions,
)


@dataclass(frozen=True)
class WarmUpTargets:
    """The serving pods of one managed model, for the warm-up that follows the reconcile."""

    pods: list[Manifest]
    runtime: str
    port: int


@dataclass(frozen=True)
class Outcome:
    status: dict[str, Any]
    transitions: list[ConditionState]
    warmup: WarmUpTargets | None = field(default=None)


def context_from(body: Manifest, images: RuntimeImages, network: NetworkPeers | None = None) -> ModelContext:
    meta = body["metadata"]
    return ModelContext(
        name=meta["name"],
        namespace=meta["namespace"],
        uid=meta["uid"],
        spec=v1alpha1.InferenceModelSpec.model_validate(body.get("spec") or {}),
        images=images,
        network=network,
    )


def probe_endpoint(url: str, timeout: float) -> tuple[bool, str]:
    """Any HTTP answer means the server is there; only connection failures count as unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True, ""
    except urllib.error.HTTPError:
        return True, ""
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, str(reason)
    except ValueError as exc:  # a URL the schema accepts but urllib cannot use: bad port, bad host (IDNA)
        return False, f"unusable URL: {exc}"


def spec_errors(exc: ValidationError) -> str:
    """A pydantic error as field paths of the spec and what each needs."""
    return "; ".join(f"spec.{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors())


def refusal(exc: ApiException) -> str | None:
    """The API server's message when it refused a child as invalid (a retry cannot help), else None."""
    if exc.status not in (400, 422):
        return None
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return f"the API server refused a child: {message or exc.reason}"


def namespace_terminating(exc: ApiException) -> bool:
    """The model's namespace is being deleted: nothing can be created in it, and nothing needs to be."""
    if exc.status != 403:
        return False
    try:
        causes = json.loads(exc.body or "{}").get("details", {}).get("causes") or []
    except (ValueError, AttributeError):
        return False
    return any(cause.get("reason") == "NamespaceTerminating" for cause in causes)


def selector_string(context: ModelContext) -> str:
    return ",".join(f"{key}={value}" for key, value in selector_labels(context).items())


def apply_or_delete(kube: Kube, kind: str, desired: Manifest | None, context: ModelContext) -> Manifest | None:
    if desired is not None:
        return kube.apply(desired)
    kube.delete(kind, context.namespace, child_name(context))
    return None


def apply_hpa(kube: Kube, context: ModelContext) -> str:
    """Apply (or delete) the HPA; returns the API server's refusal of minReplicas 0, if it refused it.

    Before Kubernetes 1.37 the HPAScaleToZero feature is off by default, and the API server refuses
    minReplicas 0. The model then keeps one replica, and its status says why, rather than failing.
    """
    desired = autoscaling.build_hpa(context)
    if desired is None or desired["spec"]["minReplicas"] > 0:
        apply_or_delete(kube, "HorizontalPodAutoscaler", desired, context)
        return ""
    try:
        kube.apply(desired)
        return ""
    except ApiException as exc:
        refused = refusal(exc)
        if refused is None or "minReplicas" not in refused:
            raise
    floored = autoscaling.build_hpa(context, scale_to_zero=False)
    if floored is not None:
        kube.apply(floored)
    return refused


def job_failure_message(kube: Kube, job: Manifest) -> str:
    """What the prefetch script wrote to its termination log on its last failure, if anything."""
    name = job["metadata"]["name"]
    pods = kube.list("Pod", job["metadata"]["namespace"], f"batch.kubernetes.io/job-name={name}")
    messages = []
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or ""):
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode") and terminated.get("message"):
                messages.append(str(terminated["message"]).strip().splitlines()[-1])
    return messages[-1] if messages else ""


def job_failed(job: Manifest | None) -> bool:
    return any(
        c.get("type") == "Failed" and c.get("status") == "True"
        for c in ((job or {}).get("status") or {}).get("conditions") or []
    )


def job_complete(job: Manifest | None) -> bool:
    return any(
        c.get("type") == "Complete" and c.get("status") == "True"
        for c in ((job or {}).get("status") or {}).get("conditions") or []
    )


def volume_node(pods: list[Manifest]) -> str | None:
    """The node where the model's pods run now (and so where its volume is mounted)."""
    nodes = sorted(
        {
            pod["spec"]["nodeName"]
            for pod in pods
            if (pod.get("spec") or {}).get("nodeName") and not pod["metadata"].get("deletionTimestamp")
        }
    )
    return nodes[0] if nodes else None


def rollout_complete(deployment: Manifest) -> bool:
    """Every replica runs the current pod template and is Ready (warmed up), and no old pod is left."""
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    wanted = spec.get("replicas", 1)
    return bool(
        status.get("observedGeneration") == deployment["metadata"].get("generation")
        and (status.get("updatedReplicas") or 0) == wanted
        and (status.get("replicas") or 0) == wanted
        and (status.get("readyReplicas") or 0) == wanted
    )


def served_model(deployment: Manifest | None, previous: str | None) -> str | None:
    """The model name the router may send: the new pods' once they are all rolled out, else the old one's."""
    if deployment is None:
        return previous
    template = (deployment.get("spec") or {}).get("template") or {}
    current = ((template.get("metadata") or {}).get("annotations") or {}).get(SERVED_MODEL_ANNOTATION)
    if current is not None and (previous is None or rollout_complete(deployment)):
        return str(current)
    return previous


def reconcile_managed(kube: Kube, context: ModelContext) -> Observed:
    # First, so that no pod of the model ever runs unprotected.
    apply_or_delete(kube, "NetworkPolicy", networkpolicy.build_network_policy(context), context)
    claim = cache.build_cache_claim(context)
    observed_claim = kube.apply(claim) if claim is not None else kube.get(
        "PersistentVolumeClaim", context.namespace, context.cache_claim_name
    )  # fmt: skip
    pods = kube.list("Pod", context.namespace, selector_string(context))
    kube.apply(service.build_service(context))
    if observed_claim is None:
        # The user's existingClaim does not exist: nothing can be downloaded or served until it does.
        return Observed(
            deployment=kube.get("Deployment", context.namespace, child_name(context)),
            pods=pods,
            missing_claim=context.cache_claim_name,
        )
    context = dataclasses.replace(
        context, cache_claim_uid=observed_claim["metadata"].get("uid"), volume_node=volume_node(pods)
    )
    job = cache.build_prefetch_job(context)
    observed_job = None
    if job is not None:
        # A Job's pod template cannot change, and its name already says what it fetches into which
        # volume: an existing one is only read (the node it was placed on may have changed since).
        observed_job = kube.get("Job", context.namespace, job["metadata"]["name"]) or kube.apply(job)
    # Jobs of earlier models or volumes have served their purpose; the volume keeps their weights.
    for stale in kube.list(
        "Job", context.namespace, f"{MODEL_LABEL}={context.name},{COMPONENT_LABEL}={MODEL_PREFETCH}"
    ):
        if job is None or stale["metadata"]["name"] != job["metadata"]["name"]:
            kube.delete("Job", context.namespace, stale["metadata"]["name"])

    deployment: Manifest | None
    scale_to_zero_refused = ""
    if observed_job is None or job_complete(observed_job):
        deployment = kube.apply(workload.build_deployment(context))
        scale_to_zero_refused = apply_hpa(kube, context)
        apply_or_delete(kube, "PodDisruptionBudget", autoscaling.build_pdb(context), context)
    else:
        # Pods start only once the weights are cached; a running older version keeps serving meanwhile.
        deployment = kube.get("Deployment", context.namespace, child_name(context))
    return Observed(
        deployment=deployment,
        pods=pods,
        prefetch_job=observed_job,
        prefetch_expected=job is not None,
        prefetch_failure=job_failure_message(kube, observed_job)
        if observed_job is not None and job_failed(observed_job)
        else "",
        scale_to_zero_refused=scale_to_zero_refused,
        unloaded=context.unloaded,
    )


def apply_and_observe(
    kube: Kube, context: ModelContext, probe_timeout: float, previous_status: dict[str, Any]
) -> tuple[dict[str, Any], list[ConditionState], WarmUpTargets | None]:
    """Status fields and conditions of the model, after applying its children (managed models)."""
    if context.spec.endpoint is not None:
        url = context.spec.endpoint.url
        reachable, error = probe_endpoint(url, probe_timeout)
        observed = Observed(managed=False, endpoint_url=url, endpoint_reachable=reachable,
                            endpoint_error=error)  # fmt: skip
        return {"endpoint": url}, conditions_for(observed), None
    observed = reconcile_managed(kube, context)
    deployment_status = (observed.deployment or {}).get("status") or {}
    fields: dict[str, Any] = {
        "endpoint": service.service_url(context),
        "replicas": deployment_status.get("replicas") or 0,
        "readyReplicas": deployment_status.get("readyReplicas") or 0,
        "selector": selector_string(context),
        # What a load restores after an unload has set spec.replicas to 0.
        "loadReplicas": context.spec.replicas or previous_status.get("loadReplicas") or 1,
    }
    served = served_model(observed.deployment, previous_status.get("servedModel"))
    if served is not None:
        fields["servedModel"] = served
    timings = phase_timings(observed)
    if timings:
        fields["timings"] = timings
    states = conditions_for(
        observed,
        gpu_resource=context.resources.gpu_resource,
        gpus=context.resources.gpu,
        memory=str(context.resources.memory) if context.resources.memory is not None else None,
    )
    targets = WarmUpTargets(pods=observed.pods, runtime=context.runtime, port=workload.serving_port(context))
    return fields, states, targets


def reconcile(
    kube: Kube, body: Manifest, images: RuntimeImages, probe_timeout: float = 2.0, network: NetworkPeers | None = None
) -> Outcome:
    generation = body["metadata"].get("generation", 0)
    previous_status = body.get("status") or {}
    status: dict[str, Any] = {"observedGeneration": generation}
    targets: WarmUpTargets | None = None
    try:
        fields, states, targets = apply_and_observe(
            kube, context_from(body, images, network), probe_timeout, previous_status
        )
        status.update(fields)
    except ValidationError as exc:
        states = conditions_for(Observed(rejected=spec_errors(exc)))
    except ApiException as exc:
        refused = refusal(exc)
        if refused is None:
            raise  # transient or a permission problem: Kopf retries
        states = conditions_for(Observed(rejected=refused))
    previous_conditions = previous_status.get("conditions") or []
    status["phase"] = phase_for(states)
    status["conditions"] = merge_conditions(previous_conditions, states, generation)
    return Outcome(status=status, transitions=transitions(previous_conditions, states), warmup=targets)


def status_changed(previous: dict[str, Any], new: dict[str, Any]) -> bool:
    """True when a status patch would change anything (timestamps of unchanged conditions are kept)."""
    return any(previous.get(key) != value for key, value in new.items())
