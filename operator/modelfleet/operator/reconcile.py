"""One reconcile of one InferenceModel: read spec, build desired children, apply, observe, compute status.

Level-based: it derives everything from the current spec and the cluster as it is now, so running
it twice, concurrently or after a crash gives the same result.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from modelfleet.api import v1alpha1
from modelfleet.operator.apply import Kube, Manifest
from modelfleet.operator.builders import autoscaling, cache, networkpolicy, service, workload
from modelfleet.operator.builders.common import (
    MODEL_LABEL,
    ModelContext,
    NetworkPeers,
    RuntimeImages,
    child_name,
    selector_labels,
)
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
class Outcome:
    status: dict[str, Any]
    transitions: list[ConditionState]


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


def reconcile_managed(kube: Kube, context: ModelContext) -> Observed:
    # First, so that no pod of the model ever runs unprotected.
    apply_or_delete(kube, "NetworkPolicy", networkpolicy.build_network_policy(context), context)
    claim = cache.build_cache_claim(context)
    if claim is not None:
        kube.apply(claim)
    job = cache.build_prefetch_job(context)
    observed_job = kube.apply(job) if job is not None else None
    # Jobs of earlier models have served their purpose; the volume keeps their weights.
    for stale in kube.list(
        "Job", context.namespace, f"{MODEL_LABEL}={context.name},app.kubernetes.io/component=model-prefetch"
    ):
        if job is None or stale["metadata"]["name"] != job["metadata"]["name"]:
            kube.delete("Job", context.namespace, stale["metadata"]["name"])

    kube.apply(service.build_service(context))
    cached = observed_job is None or any(
        c.get("type") == "Complete" and c.get("status") == "True"
        for c in (observed_job.get("status") or {}).get("conditions") or []
    )
    deployment: Manifest | None
    if cached:
        deployment = kube.apply(workload.build_deployment(context))
        apply_or_delete(kube, "HorizontalPodAutoscaler", autoscaling.build_hpa(context), context)
        apply_or_delete(kube, "PodDisruptionBudget", autoscaling.build_pdb(context), context)
    else:
        # Pods start only once the weights are cached; a running older version keeps serving meanwhile.
        deployment = kube.get("Deployment", context.namespace, child_name(context))
    pods = kube.list("Pod", context.namespace, selector_string(context))
    return Observed(
        deployment=deployment,
        pods=pods,
        prefetch_job=observed_job,
        prefetch_expected=job is not None,
    )


def apply_and_observe(
    kube: Kube, context: ModelContext, probe_timeout: float
) -> tuple[dict[str, Any], list[ConditionState]]:
    """Status fields and conditions of the model, after applying its children (managed models)."""
    if context.spec.endpoint is not None:
        url = context.spec.endpoint.url
        reachable, error = probe_endpoint(url, probe_timeout)
        observed = Observed(managed=False, endpoint_url=url, endpoint_reachable=reachable,
                            endpoint_error=error)  # fmt: skip
        return {"endpoint": url}, conditions_for(observed)
    observed = reconcile_managed(kube, context)
    deployment_status = (observed.deployment or {}).get("status") or {}
    fields: dict[str, Any] = {
        "endpoint": service.service_url(context),
        "replicas": deployment_status.get("replicas") or 0,
        "readyReplicas": deployment_status.get("readyReplicas") or 0,
        "selector": selector_string(context),
    }
    timings = phase_timings(observed)
    if timings:
        fields["timings"] = timings
    return fields, conditions_for(observed, gpu_resource=context.resources.gpu_resource, gpus=context.resources.gpu)


def reconcile(
    kube: Kube, body: Manifest, images: RuntimeImages, probe_timeout: float = 2.0, network: NetworkPeers | None = None
) -> Outcome:
    generation = body["metadata"].get("generation", 0)
    previous_status = body.get("status") or {}
    status: dict[str, Any] = {"observedGeneration": generation}
    try:
        fields, states = apply_and_observe(kube, context_from(body, images, network), probe_timeout)
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
    return Outcome(status=status, transitions=transitions(previous_conditions, states))


def status_changed(previous: dict[str, Any], new: dict[str, Any]) -> bool:
    """True when a status patch would change anything (timestamps of unchanged conditions are kept)."""
    return any(previous.get(key) != value for key, value in new.items())
