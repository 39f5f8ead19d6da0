"""Every manifest the pure builders produce is accepted by the real API server (server-side dry run)."""

from __future__ import annotations

import pytest
import yaml

from modelfleet.operator.builders.common import ModelContext
from tests.e2e.conftest import Cluster
from tests.support.models import COMBINATIONS, all_children, make_context

pytestmark = pytest.mark.e2e


def test_all_builder_outputs_pass_server_side_validation(cluster: Cluster, namespace: str) -> None:
    documents = []
    for index, combination in enumerate(COMBINATIONS):
        base = make_context(*combination)
        # One model per combination, so that names never collide within the dry run.
        context = ModelContext(name=f"m{index}", namespace=namespace, uid=f"uid-{index}", spec=base.spec)
        documents.extend(all_children(context))
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input_text=yaml.safe_dump_all(documents))
    accepted = [line for line in result.stdout.splitlines() if line.endswith("(server dry run)")]
    assert len(accepted) == len(documents), result.stdout + result.stderr
    kinds = {doc["kind"] for doc in documents}
    assert kinds == {"Deployment", "Service", "PersistentVolumeClaim", "Job", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget"}  # fmt: skip
