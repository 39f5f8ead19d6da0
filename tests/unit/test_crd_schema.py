"""The generated CRD schema is structural, documented everywhere, and current."""

from __future__ import annotations

import re
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


# Found by fuzzing InferenceModels through the API server (tests/e2e/test_inferencemodel_fuzz.py): each
# of these specs was accepted, and then the operator could not create the model's children.


def node_at(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = schema
    for part in dotted.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


def rule_texts(node: dict[str, Any]) -> str:
    return " ".join(f"{rule['rule']} {rule['message']}" for rule in node.get("x-kubernetes-validations", []))


def test_model_names_fit_the_service_name_im_prefix(schema: dict[str, Any]) -> None:
    (rule,) = schema["x-kubernetes-validations"]
    assert f"size() <= {v1alpha1.MAX_NAME_LENGTH}" in rule["rule"]
    assert "metadata.name" in rule["message"]
    assert len("im-") + v1alpha1.MAX_NAME_LENGTH == 63  # a Service name is a DNS label
    label = re.compile(v1alpha1.DNS_LABEL)
    assert label.match("a" * 60)
    assert not label.match("a.b")
    assert not label.match("-a")


@pytest.mark.parametrize(
    ("pattern", "good", "bad"),
    [
        (v1alpha1.DNS_SUBDOMAIN, ["a", "fast-ssd", "a.b-c.d"], ["Bad", "a_b", "-a", "a.", "a..b", "a b"]),
        (v1alpha1.QUALIFIED_NAME, ["pool", "example.com/pool", "A.b_c-D"], ["bad key", "a/b/c", "/x", "x" * 64]),
        (v1alpha1.EXTENDED_RESOURCE, ["nvidia.com/gpu", "gpu.intel.com/i915"], ["gpu", "nvidia.com/", "a b/c"]),
        (v1alpha1.LABEL_VALUE, ["", "v", "a.b_c-d", "v" * 63], ["-x", "a b", "v" * 64]),
        (v1alpha1.ENV_VAR_NAME, ["A", "dotted.name", "with space"], ["A=B", "tab\there", "ü"]),
        (v1alpha1.CONFIG_KEY, ["token", "api_key.v-1"], ["a b", "a/b"]),
    ],
)
def test_name_patterns(pattern: str, good: list[str], bad: list[str]) -> None:
    """The patterns are RE2 for CEL; these ones mean the same in Python's re."""
    compiled = re.compile(pattern)
    assert all(compiled.match(value) for value in good), good
    assert not any(compiled.match(value) for value in bad), bad


def test_fields_the_children_would_refuse_are_checked_when_the_model_is_written(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    checked = {
        "resources.gpuResource": "extended resource name",
        "resources.cpu": "isLessThan(quantity('0'))",
        "resources.memory": "isLessThan(quantity('0'))",
        "cache.size": "isGreaterThan(quantity('0'))",
        "cache.storageClassName": "DNS subdomain",
        "cache.existingClaim": "DNS subdomain",
        "cache.hfTokenSecretRef.name": "DNS subdomain",
        "cache.hfTokenSecretRef.key": "Secret key",
        "scheduling.priorityClassName": "DNS subdomain",
        "scheduling.runtimeClassName": "DNS subdomain",
        "scheduling.nodeSelector": "label keys",
        "scheduling.tolerations.[].key": "taint key",
        "engine.env.[].name": "printable ASCII",
        "engine.env.[]": "value or valueFrom",
        "image": "image reference",
        "model": "no control characters",
        "serving.aliases.[]": "no control characters",
        "endpoint.url": "1 to 65535",
    }
    for path, fragment in checked.items():
        assert fragment in rule_texts(node_at(spec, path)), path
    assert "must not carry credentials" in rule_texts(node_at(spec, "endpoint.url"))
    assert node_at(spec, "scheduling.nodeSelector")["additionalProperties"]["maxLength"] == 63


def test_tolerations_are_typed_and_lists_have_unique_keys(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    toleration = node_at(spec, "scheduling.tolerations.[]")
    assert toleration["properties"]["operator"]["enum"] == ["Exists", "Equal"]
    assert "NoExecute" in toleration["properties"]["effect"]["enum"]
    assert "x-kubernetes-preserve-unknown-fields" not in toleration
    assert "operator Exists" in rule_texts(toleration)
    env = node_at(spec, "engine.env")
    assert (env["x-kubernetes-list-type"], env["x-kubernetes-list-map-keys"]) == ("map", ["name"])
    assert node_at(spec, "serving.aliases")["x-kubernetes-list-type"] == "set"
    assert node_at(spec, "serving.cache.ttlSeconds")["maximum"] == 31536000
