"""The sample InferenceModels of docs/own-cluster.md (examples/) are accepted by the real API server's CRD
validation, its CEL rules included, and so are the children the operator's builders make of them (server-side
dry run). The chart with examples/values-gpu-cluster.yaml is checked in tests/e2e/test_chart.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfleet.api import v1alpha1
from modelfleet.operator.builders import networkpolicy
from modelfleet.operator.builders.common import ModelContext, NetworkPeers
from tests.e2e.conftest import Cluster
from tests.support.models import all_children

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODELS = sorted(EXAMPLES.glob("inferencemodel-*.yaml"))


def in_namespace(path: Path, namespace: str) -> dict[str, Any]:
    """The sample as a user applies it, in the test's namespace instead of `models`."""
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    document["metadata"]["namespace"] = namespace
    return document


def accepted(cluster: Cluster, documents: list[dict[str, Any]]) -> tuple[int, str]:
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input_text=yaml.safe_dump_all(documents),
                             check=False)  # fmt: skip
    return sum(line.endswith("(server dry run)") for line in result.stdout.splitlines()), result.stderr


@pytest.mark.parametrize("path", MODELS, ids=lambda path: path.stem)
def test_a_sample_model_and_its_children_pass_server_side_validation(
    path: Path, cluster: Cluster, inferencemodel_crd: str, namespace: str
) -> None:
    document = in_namespace(path, namespace)
    count, errors = accepted(cluster, [document])
    assert count == 1, errors
    spec = v1alpha1.InferenceModelSpec.model_validate(document["spec"])
    context = ModelContext(document["metadata"]["name"], namespace, "uid-1", spec, network=NetworkPeers())
    children = [*all_children(context), networkpolicy.build_network_policy(context)]
    documents = [child for child in children if child]
    count, errors = accepted(cluster, documents)
    assert count == len(documents), errors


def test_the_check_refuses_a_broken_sample(cluster: Cluster, inferencemodel_crd: str, namespace: str) -> None:
    """The same dry run fails on a sample with a field the CRD refuses (so the test above can fail)."""
    document = in_namespace(EXAMPLES / "inferencemodel-vllm-gpu.yaml", namespace)
    document["spec"]["autoscaling"]["metric"] = "engine"
    document["spec"]["autoscaling"]["minReplicas"] = 0
    count, errors = accepted(cluster, [document])
    assert count == 0
    assert "minReplicas 0 needs metric 'router'" in errors
