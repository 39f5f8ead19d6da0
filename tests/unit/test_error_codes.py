"""The router's error catalogue (errors.py): every error is one of ERROR_CODES, whose table docs/router.md carries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from modelfleet.server import errors
from modelfleet.server.errors import ERROR_CODES, MODEL_NOT_FOUND, UPSTREAM_REJECTED, BackendUnreachable, ErrorCode

pytestmark = pytest.mark.unit

SERVER = Path(errors.__file__).parent


def test_every_error_code_is_in_the_catalogue_once() -> None:
    defined = [value for value in vars(errors).values() if isinstance(value, ErrorCode)]
    assert sorted(code.code for code in defined) == sorted(code.code for code in ERROR_CODES)
    assert len({code.code for code in ERROR_CODES}) == len(ERROR_CODES)


def test_an_error_code_builds_the_error_it_names() -> None:
    error = MODEL_NOT_FOUND("The model `x` does not exist.", param="model")
    assert (error.status, error.type, error.code, error.param, error.message) == (
        404, "not_found_error", "model_not_found", "model", "The model `x` does not exist.")  # fmt: skip
    assert UPSTREAM_REJECTED("no", status=422).status == 422
    assert isinstance(errors.UPSTREAM_UNAVAILABLE("gone", kind=BackendUnreachable), BackendUnreachable)


def test_no_module_builds_an_error_by_hand() -> None:
    """Outside errors.py, a RouterError comes from an ErrorCode, so that docs/router.md's table is complete."""
    by_hand = []
    for path in SERVER.rglob("*.py"):
        if path.name == "errors.py" or path.name == "hotpath.py":  # hotpath: the one 500, like errors.py's
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("RouterError", "BackendUnreachable"):
                by_hand.append(f"{path.relative_to(SERVER)}:{node.lineno}")
    assert by_hand == []
