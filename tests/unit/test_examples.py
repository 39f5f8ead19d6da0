"""The samples of docs/own-cluster.md (examples/): the InferenceModels are read by the typed API and every pure
builder builds their children, as the operator would; the chart values pass the chart's schema. The API server's
own checks (CEL rules, the rendered chart) are in tests/e2e/test_examples.py and tests/e2e/test_chart.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from modelfleet.api import v1alpha1
from modelfleet.operator.builders import networkpolicy
from modelfleet.operator.builders.common import ModelContext, NetworkPeers
from tests.support.models import all_children

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
MODELS = sorted(EXAMPLES.glob("inferencemodel-*.yaml"))
VALUES = EXAMPLES / "values-gpu-cluster.yaml"
SCHEMA = REPO / "charts" / "modelfleet" / "values.schema.json"


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


def context_of(document: dict[str, Any]) -> ModelContext:
    spec = v1alpha1.InferenceModelSpec.model_validate(document["spec"])
    return ModelContext(name=document["metadata"]["name"], namespace=document["metadata"]["namespace"],
                        uid="uid-1", spec=spec, network=NetworkPeers())  # fmt: skip


def test_the_docs_samples_are_all_here() -> None:
    assert [path.name for path in MODELS] == ["inferencemodel-ollama.yaml", "inferencemodel-vllm-gpu.yaml"]


@pytest.mark.parametrize("path", MODELS, ids=lambda path: path.stem)
def test_a_sample_model_is_read_by_the_api_and_builds_its_children(path: Path) -> None:
    document = load(path)
    assert (document["apiVersion"], document["kind"]) == (f"{v1alpha1.GROUP}/{v1alpha1.VERSION}", "InferenceModel")
    context = context_of(document)
    children = [*all_children(context), networkpolicy.build_network_policy(context)]
    assert {child["kind"] for child in children if child} == {
        "Deployment", "Service", "PersistentVolumeClaim", "Job", "HorizontalPodAutoscaler", "PodDisruptionBudget",
        "NetworkPolicy"}  # fmt: skip
    deployment = next(child for child in children if child and child["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (engine,) = [c for c in pod["containers"] if c["name"] == document["spec"]["runtime"]]
    # One GPU per replica, on a GPU node whose taint is tolerated, without the sample saying so.
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    hpa = next(child for child in children if child and child["kind"] == "HorizontalPodAutoscaler")
    autoscaling = document["spec"]["autoscaling"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        autoscaling["minReplicas"], autoscaling["maxReplicas"])  # fmt: skip
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"]["name"] == "modelfleet_queue_depth"


def test_the_sample_values_pass_the_charts_schema() -> None:
    # Draft 7, which helm validates with (the file's $schema says https://, which jsonschema does not know).
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    validator.validate(load(VALUES))
    # The check can fail: a misspelt key is refused, as helm refuses it.
    with pytest.raises(jsonschema.ValidationError, match="ingres"):
        validator.validate({**load(VALUES), "ingres": {"enabled": True}})
