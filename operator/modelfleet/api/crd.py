"""Generate the InferenceModel CustomResourceDefinition from the typed models in v1alpha1.

    python -m modelfleet.api.crd [OUTPUT]      write the CRD YAML (default: stdout)

Pydantic's JSON Schema is close to what Kubernetes wants, but a CRD needs a *structural* schema:
no $ref, no anyOf for optional fields, explicit types, and Kubernetes' own extensions.  This
module converts one into the other and adds the CRD's printer columns and subresources.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from modelfleet.api import v1alpha1

JsonSchema = dict[str, Any]

# Keys of JSON Schema that a structural CRD schema accepts as they are.
KEPT_KEYS = {
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "format",
}


class SchemaError(ValueError):
    """The typed model uses a construct that has no structural-schema equivalent."""


def resolve(node: JsonSchema, definitions: dict[str, JsonSchema]) -> JsonSchema:
    ref = node.get("$ref")
    if ref is None:
        return node
    target = definitions[ref.rsplit("/", 1)[-1]]
    # A $ref beside siblings (e.g. description) keeps the siblings over the target's.
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def structural(node: JsonSchema, definitions: dict[str, JsonSchema]) -> JsonSchema:
    """Convert one pydantic JSON Schema node into a structural CRD schema node."""
    node = resolve(node, definitions)
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        siblings = {k: v for k, v in node.items() if k != "anyOf"}
        if siblings.get("default", "absent") is None:
            del siblings["default"]  # Optional[...] = None means "unset", not a null default
        if len(variants) == 1:
            return structural({**resolve(variants[0], definitions), **siblings}, definitions)
        if siblings.get("x-kubernetes-int-or-string") or {v.get("type") for v in variants} == {"integer", "string"}:
            return structural({**siblings, "x-kubernetes-int-or-string": True}, definitions)
        raise SchemaError(f"unsupported union: {node['anyOf']}")

    out: JsonSchema = {key: value for key, value in node.items() if key in KEPT_KEYS}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            out[key] = value
    if "const" in node:
        out["enum"] = [node["const"]]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if node.get("type") == "object" or "properties" in node:
        out["type"] = "object"
        if "properties" in node:
            out["properties"] = {name: structural(prop, definitions) for name, prop in node["properties"].items()}
        additional = node.get("additionalProperties")
        if isinstance(additional, dict) and additional:
            out["additionalProperties"] = structural(additional, definitions)
        elif "properties" not in node and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("type") == "array":
        out["items"] = structural(node.get("items", {}), definitions)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "required" in out and not out["required"]:
        del out["required"]
    return out


def model_schema(model: type[v1alpha1.Model]) -> JsonSchema:
    raw = model.model_json_schema(by_alias=True, mode="validation", ref_template="#/$defs/{model}")
    definitions = raw.pop("$defs", {})
    return structural(raw, definitions)


def printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Runtime", "type": "string", "jsonPath": ".spec.runtime"},
        {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Replicas", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 0},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def crd() -> dict[str, Any]:
    spec_schema = model_schema(v1alpha1.InferenceModelSpec)
    status_schema = model_schema(v1alpha1.InferenceModelStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{v1alpha1.PLURAL}.{v1alpha1.GROUP}",
            "annotations": {"modelfleet.io/generated-by": "python -m modelfleet.api.crd"},
        },
        "spec": {
            "group": v1alpha1.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": v1alpha1.KIND,
                "listKind": f"{v1alpha1.KIND}List",
                "plural": v1alpha1.PLURAL,
                "singular": v1alpha1.SINGULAR,
                "shortNames": v1alpha1.SHORT_NAMES,
                "categories": v1alpha1.CATEGORIES,
            },
            "versions": [
                {
                    "name": v1alpha1.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (
                                "An InferenceModel serves one LLM: the operator runs it on Ollama or vLLM (or points "
                                "at an existing endpoint), and the ModelFleet router serves it through one API."
                            ),
                            "required": ["spec"],
                            "x-kubernetes-validations": v1alpha1.OBJECT_RULES,
                            "properties": {
                                "apiVersion": {"type": "string", "description": "API version of this object."},
                                "kind": {"type": "string", "description": "Kind of this object."},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": printer_columns(),
                }
            ],
        },
    }


def render() -> str:
    header = (
        "# Generated by `make generate` (python -m modelfleet.api.crd) from modelfleet.api.v1alpha1. Do not edit.\n"
    )
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


def main(argv: list[str]) -> int:
    text = render()
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
