"""The InferenceModel reference (docs/inferencemodel.md, written by hack/api_reference.py) names every field of the
CRD's schema with what the API server enforces on it, and `--check` refuses a stale page."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hack import api_reference

pytestmark = pytest.mark.unit

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "inferencemodel.md"


def properties(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property path under `node` (spec.engine.env[].name), through objects, list items and map values."""
    for name, child in (node.get("properties") or {}).items():
        child_path = f"{path}.{name}"
        yield child_path, child
        yield from properties(child, child_path)
    if isinstance(node.get("items"), dict):
        yield from properties(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from properties(node["additionalProperties"], f"{path}{{}}")


def crd_properties() -> list[tuple[str, dict[str, Any]]]:
    schema = api_reference.openapi_schema()
    found = []
    for root in ("spec", "status"):
        found += [(root, schema["properties"][root]), *properties(schema["properties"][root], root)]
    return found


@pytest.fixture(scope="module")
def reference() -> str:
    return api_reference.render()


def row_of(reference: str, path: str) -> str:
    """The table row that documents the field at `path`."""
    rows = re.findall(rf"^\| \[?`{re.escape(path)}`.*$", reference, re.MULTILINE)
    assert rows, f"{path} has no row in the InferenceModel reference"
    assert len(rows) == 1, f"{path} has {len(rows)} rows"
    return rows[0]


def test_every_property_of_the_crd_has_a_row_with_its_type_default_and_description(reference: str) -> None:
    paths = crd_properties()
    assert len(paths) > 90  # the walk reached the nested fields, not just the top level
    for path, node in paths:
        row = row_of(reference, path)
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]]
        _field, kind, default, _validation, description = cells
        assert kind, f"{path} has no type"
        if "default" in node:
            assert default == api_reference.value(node["default"]).replace("|", "\\|"), path
        assert description == api_reference.cell(node.get("description", "")), path


def test_every_limit_and_rule_of_the_crd_is_in_the_reference(reference: str) -> None:
    schema = api_reference.openapi_schema()
    nodes = [("", schema), *crd_properties()]
    for path, node in nodes:
        for item in node.get("enum", []):
            assert api_reference.value(item) in reference, f"{path}: enum value {item!r}"
        for key in ("minimum", "maximum", "minLength", "maxLength", "maxItems", "maxProperties"):
            if key in node:
                assert str(node[key]) in (row_of(reference, path) if path else reference), f"{path}: {key}"
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["message"] in reference, f"{path}: the message of {rule['rule']!r}"
            assert " ".join(rule["rule"].split()) in reference, f"{path}: the rule {rule['rule']!r}"


def test_every_link_points_at_a_section(reference: str) -> None:
    anchors = {api_reference.anchor(path) for path, _ in api_reference.sections(api_reference.openapi_schema())}
    links = re.findall(r"\]\(#([^)]+)\)", reference)
    assert links
    assert set(links) <= anchors


def test_the_committed_reference_is_current() -> None:
    assert api_reference.main(["--check", str(REFERENCE)]) == 0, "docs/inferencemodel.md is stale: run `make generate`"


def test_check_fails_on_a_stale_reference_and_generate_fixes_it(tmp_path: Path) -> None:
    page = tmp_path / "inferencemodel.md"
    page.write_text(REFERENCE.read_text().replace("`spec.serving.maxQueue`", "`spec.serving.maxQ`"))
    assert api_reference.main(["--check", str(page)]) == 1
    assert api_reference.main([str(page)]) == 0
    assert page.read_text() == REFERENCE.read_text()
    assert api_reference.main(["--check", str(page)]) == 0


def test_check_fails_when_the_markers_are_gone(tmp_path: Path) -> None:
    page = tmp_path / "inferencemodel.md"
    page.write_text("# The InferenceModel API reference\n")
    assert api_reference.main(["--check", str(page)]) == 1
