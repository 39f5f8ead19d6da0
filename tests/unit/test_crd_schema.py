"""The generated CRD schema is structural, documented everywhere, and current."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfleet.api import crd, v1alpha1

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    document = crd.crd()
    root: dict[str, Any] = document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return root


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in walk(schema):
        assert not {"$ref", "anyOf", "allOf", "title"} & set(node), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if node.get("type") == "object" and path not in ("", ".metadata"):
            assert (
                "properties" in node
                or "additionalProperties" in node
                or node.get("x-kubernetes-preserve-unknown-fields")
            ), path


def test_every_spec_and_status_field_has_a_description(schema: dict[str, Any]) -> None:
    for root in ("spec", "status"):
        for path, node in walk(schema["properties"][root], f".{root}"):
            if path.endswith("[]") or path.endswith("{}"):
                continue
            assert node.get("description"), f"{path} has no description for kubectl explain"


def test_defaults_and_validation_rules(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    assert spec["properties"]["replicas"]["default"] == 1
    assert spec["properties"]["replicas"]["minimum"] == 0
    assert spec["properties"]["runtime"]["enum"] == ["ollama", "vllm"]
    assert spec["properties"]["cache"]["properties"]["size"]["default"] == "20Gi"
    rules = " ".join(rule["rule"] for rule in spec["x-kubernetes-validations"])
    assert "minReplicas <= self.autoscaling.maxReplicas" in rules
    assert "has(self.endpoint) || has(self.runtime)" in rules
    assert all(rule["message"] for rule in spec["x-kubernetes-validations"])


def test_crd_has_printer_columns_and_subresources() -> None:
    version = crd.crd()["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]][:5] == [
        "Runtime", "Model", "Ready", "Replicas", "Endpoint",
    ]  # fmt: skip
    assert version["additionalPrinterColumns"][-1]["name"] == "Age"
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert "status" in version["subresources"]


def test_committed_crds_are_current() -> None:
    rendered = crd.render()
    for path in (
        "crds/modelfleet.io_inferencemodels.yaml",
        "charts/modelfleet/crds/modelfleet.io_inferencemodels.yaml",
    ):
        assert (REPO_ROOT / path).read_text() == rendered, f"{path} is stale: run `make generate`"
    assert yaml.safe_load(rendered)["metadata"]["name"] == "inferencemodels.modelfleet.io"


def test_typed_spec_parses_camel_case_and_rejects_unknown_fields() -> None:
    spec = v1alpha1.InferenceModelSpec.model_validate(
        {
            "runtime": "vllm",
            "model": "Qwen/Qwen2.5-7B-Instruct-AWQ",
            "resources": {"gpu": 1, "gpuResource": "amd.com/gpu"},
        }
    )
    assert spec.resources is not None
    assert spec.resources.gpu_resource == "amd.com/gpu"
    with pytest.raises(ValueError, match="extra"):
        v1alpha1.InferenceModelSpec.model_validate({"runtime": "vllm", "model": "x", "replica": 2})
