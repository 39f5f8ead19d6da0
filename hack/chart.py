"""Generated parts of the Helm chart and the plain manifests, or a check that they are current.

    python -m hack.chart generate   # values.schema.json, the chart's Kopf peering CRDs, manifests/install.yaml
    python -m hack.chart check      # exit 1 and say which file is stale

values.schema.json comes from values.yaml itself: a key documented with a `# -- ...` comment is a
setting (its default's type, free-form when it is a map or list); a key without one is a section,
whose keys are all the keys it may have (unknown keys are refused, so a typo fails the install).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART = REPO_ROOT / "charts" / "modelfleet"
VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"
PEERING_SOURCE = REPO_ROOT / "manifests" / "kopf-peering.yaml"
PEERING_CRDS = CHART / "crds" / "kopf.dev_peerings.yaml"
INSTALL = REPO_ROOT / "manifests" / "install.yaml"
HELM = REPO_ROOT / ".cache" / "bin" / "helm"

# What plain-manifest users get: the chart's defaults, except keys they create themselves (a
# generated Secret would change on every render).
INSTALL_RELEASE, INSTALL_NAMESPACE = "modelfleet", "modelfleet-system"
INSTALL_SETTINGS = ["router.auth.existingSecret=modelfleet-api-keys"]

ENUMS: dict[str, list[str]] = {
    "router.rateLimit.failureMode": ["open", "closed"],
    "router.service.type": ["ClusterIP", "NodePort", "LoadBalancer"],
    "operator.image.pullPolicy": ["Always", "IfNotPresent", "Never"],
    "router.image.pullPolicy": ["Always", "IfNotPresent", "Never"],
    "redis.image.pullPolicy": ["Always", "IfNotPresent", "Never"],
}
MINIMUMS: dict[str, int] = {
    "operator.replicas": 1,
    "router.replicas": 1,
    "router.workers": 1,
    "router.autoscaling.minReplicas": 1,
    "router.autoscaling.maxReplicas": 1,
    "router.maxTokensCap": 1,
    "router.defaultMaxTokens": 1,
    "router.maxBodyBytes": 1024,
    "router.maxHeaderBytes": 1024,
    "router.maxConnections": 1,
    "router.headerTimeoutSeconds": 1,
    "router.service.port": 1,
}
KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z0-9_]+):")


def descriptions(values_text: str) -> dict[str, str]:
    """The `# -- ...` comment of each key, by dotted path."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in values_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and pending:
            pending.append(stripped[1:].strip())
            continue
        match = KEY_LINE.match(line)
        if not match:
            pending = [] if stripped else pending
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([key for _, key in stack] + [match["key"]])
        if pending:
            found[path] = " ".join(pending)
        pending = []
        stack.append((indent, match["key"]))
    return found


def leaf_schema(path: str, value: Any, description: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"description": description}
    if isinstance(value, bool):
        schema["type"] = "boolean"
    elif isinstance(value, int):
        schema["type"] = "integer"
        schema["minimum"] = MINIMUMS.get(path, 0)
    elif isinstance(value, float):
        schema["type"] = "number"
        schema["minimum"] = 0
    elif isinstance(value, str):
        schema["type"] = "string"
    elif isinstance(value, list):
        schema["type"] = "array"
    elif isinstance(value, dict):
        schema["type"] = "object"
    else:
        raise ValueError(f"{path}: cannot infer a type from {value!r}")
    if path in ENUMS:
        schema["enum"] = ENUMS[path]
    return schema


def section_schema(path: str, section: dict[str, Any], documented: dict[str, str]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for key, value in section.items():
        child = f"{path}.{key}" if path else key
        if child in documented:
            properties[key] = leaf_schema(child, value, documented[child])
        elif isinstance(value, dict) and value:
            properties[key] = section_schema(child, value, documented)
        else:
            raise ValueError(f"values.yaml: `{child}` has no `# --` description")
    return {"type": "object", "additionalProperties": False, "properties": properties}


def values_schema() -> str:
    text = VALUES.read_text()
    schema = {"$schema": "https://json-schema.org/draft-07/schema#", "title": "ModelFleet chart values",
              **section_schema("", yaml.safe_load(text), descriptions(text))}  # fmt: skip
    return json.dumps(schema, indent=2) + "\n"


def peering_crds() -> str:
    documents = [
        doc for doc in yaml.safe_load_all(PEERING_SOURCE.read_text()) if doc["kind"] == "CustomResourceDefinition"
    ]
    header = "# Kopf's peering kinds (group kopf.dev). Generated from manifests/kopf-peering.yaml; do not edit.\n"
    return header + yaml.safe_dump_all(documents, sort_keys=False)


def install_manifest() -> str:
    argv = [str(HELM), "template", INSTALL_RELEASE, str(CHART), "--namespace", INSTALL_NAMESPACE, "--include-crds"]
    for setting in INSTALL_SETTINGS:
        argv += ["--set", setting]
    rendered = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    header = (
        "# ModelFleet as plain manifests: `helm template` of charts/modelfleet with its defaults, release\n"
        f"# {INSTALL_RELEASE} in namespace {INSTALL_NAMESPACE}. Generated by `make generate`; do not edit.\n"
        "#   kubectl create namespace modelfleet-system\n"
        "#   kubectl -n modelfleet-system create secret generic modelfleet-api-keys --from-file=keys.yaml\n"
        "#   kubectl apply --server-side -f manifests/install.yaml\n"
    )
    return header + rendered


def outputs() -> dict[Path, str]:
    # The schema and CRDs first: the install manifest is rendered from the chart that holds them.
    return {SCHEMA: values_schema(), PEERING_CRDS: peering_crds()}


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "check"
    stale = []
    for path, content in outputs().items():
        if command == "generate":
            path.write_text(content)
        elif not path.exists() or path.read_text() != content:
            stale.append(path)
    install = install_manifest()
    if command == "generate":
        INSTALL.write_text(install)
    elif not INSTALL.exists() or INSTALL.read_text() != install:
        stale.append(INSTALL)
    for path in stale:
        print(
            f"error: {path.relative_to(REPO_ROOT)} is stale; run 'make generate' and commit the result", file=sys.stderr
        )
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
