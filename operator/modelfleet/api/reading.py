"""Reading an InferenceModel's spec as a program that may be older than the CRD.

The API server validates every object against the CRD it has, which may be newer than the reader: a
field or a value added in a later version must not stop an older router from serving the model. So a
reader types the spec with the same models the CRD is generated from, leaving out (and naming) only
what it does not know, and takes the defaults for the rest.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from modelfleet.api.v1alpha1 import InferenceModelSpec

# What a newer version of the CRD may add: a field, or a value of an enumeration. Anything else (a value of
# the wrong type, a missing required field) is a malformed spec, not a newer one.
NEWER_VERSION_ERRORS = frozenset({"extra_forbidden", "literal_error"})
# Each pass leaves out one field; a spec with more unknown fields than this is not a newer version's.
MAX_IGNORED_FIELDS = 32

Location = tuple[int | str, ...]


def read_spec(data: Mapping[str, Any]) -> tuple[InferenceModelSpec, list[str]]:
    """The typed spec, and the dotted paths of the fields left out because this version does not know them
    (or their values). Raises ValidationError for a malformed spec, or when a required field had a value
    this version does not know."""
    remaining: dict[str, Any] = copy.deepcopy(dict(data))
    ignored: list[str] = []
    while True:
        try:
            return InferenceModelSpec.model_validate(remaining), ignored
        except ValidationError as error:
            unknown = next((e["loc"] for e in error.errors() if e["type"] in NEWER_VERSION_ERRORS and e["loc"]), None)
            if unknown is None or len(ignored) >= MAX_IGNORED_FIELDS:
                raise
            ignored.append(_remove(remaining, unknown))


def _remove(tree: dict[str, Any], location: Location) -> str:
    """Remove the deepest key of `location` that exists in `tree`; returns its dotted path.

    A location may go on past the data into pydantic's own words (the member of a union, a validator), so
    the walk stops at the first part that is not a key or an index of what it has reached."""
    parent: dict[str, Any] | list[Any] = tree
    key: int | str = location[0]
    path = [str(key)]
    for part in location[1:]:
        child = parent[key]  # type: ignore[index]
        if not _holds(child, part):
            break
        parent, key = child, part
        path.append(str(part))
    del parent[key]  # type: ignore[arg-type]
    return ".".join(path)


def _holds(node: object, part: int | str) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
