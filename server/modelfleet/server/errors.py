"""The one error format of the router: OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)


class OrjsonResponse(JSONResponse):
    """JSON rendered by orjson: the router passes backend dicts through, with no response model to validate."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class RouterError(Exception):
    """An error that reaches the client as an OpenAI-style error body with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def fresh(self) -> RouterError:
        """The same error as a new instance, for another request: a raised exception keeps its traceback."""
        return RouterError(self.status, self.message, self.type, self.code, self.param, dict(self.headers))


class BackendUnreachable(RouterError):
    """The connection to one replica failed, so it never saw the request: another replica may take it."""


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """The body of every error response (documentation only: `error_body` builds it)."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


ERROR_STATUSES: dict[int | str, str] = {
    400: "Invalid request: malformed JSON, a field out of range, max_tokens above the router's cap, or no model "
    "named where the router has no default.",
    401: "No API key, or an unknown one.",
    403: "Not allowed: an admin endpoint without an admin key, or a remote model without `allow_remote: true`.",
    404: "The model does not exist (or was removed while the request waited for it).",
    409: "The model's replicas are not the operator's to change: it is static (from the router's settings) or an "
    "existing endpoint, or the Kubernetes API server refused the change.",
    413: "The request body is larger than the router accepts.",
    429: "A rate limit is reached or the model's queue is full; `retry-after` says when to retry.",
    502: "The model server failed, or cannot be reached; for load and unload, the Kubernetes API server refused.",
    503: "The model has no ready replica or is unloaded, the rate limiter is unavailable and the router fails "
    "closed, or (load and unload) the Kubernetes API server cannot be reached.",
    504: "No free replica within the queue deadline, or the model server did not answer in time.",
    "4XX": "The model server refused the request: its status and message are passed on (code `upstream_rejected`).",
}
RETRY_AFTER = {"retry-after": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}}


def error_responses(*statuses: int | str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting `statuses` with the one error body."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": ErrorBody, "description": ERROR_STATUSES[status]}
        if status == 429:
            responses[status]["headers"] = RETRY_AFTER
    return responses


# Every route that runs a generation: request validation, auth, model lookup, limits, queue and backend.
GENERATION_ERRORS = error_responses(400, 401, 403, 404, 413, 429, 502, 503, 504, "4XX")


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: RouterError) -> OrjsonResponse:
    return OrjsonResponse(
        error_body(error.message, error.type, error.code, error.param), status_code=error.status, headers=error.headers
    )


def invalid_request(errors: Sequence[Any]) -> RouterError:
    """The 400 for a body that failed validation (pydantic's error list), naming the first bad field."""
    first = errors[0] if errors else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error")
        message, param = f"The request body is not valid JSON{f' ({reason})' if reason else ''}.", None
    elif first.get("type") in ("model_attributes_type", "model_type") and not location:
        message = "The request body must be a JSON object."
    else:
        message = first.get("msg", "Invalid request.")
        message = f"{param}: {message}" if param else message
    return RouterError(400, message, code="invalid_request", param=param)


FRAMEWORK_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RouterError)
    async def router_error(_: Request, exc: RouterError) -> OrjsonResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> OrjsonResponse:
        return error_response(invalid_request(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> OrjsonResponse:
        # The framework's own refusals: an unknown path, a wrong method, a body it could not parse
        # (e.g. an integer of more than 4300 digits).
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = FRAMEWORK_CODES.get(exc.status_code)
        return error_response(RouterError(exc.status_code, str(exc.detail), type=kind, code=code))

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> OrjsonResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(RouterError(500, "The router failed to handle the request.", type="server_error"))
