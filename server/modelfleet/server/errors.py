"""The one error format of the router: OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
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


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: RouterError) -> OrjsonResponse:
    return OrjsonResponse(
        error_body(error.message, error.type, error.code, error.param), status_code=error.status, headers=error.headers
    )


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if first.get("type") == "model_attributes_type" and not location:
        return "The request body must be a JSON object.", None
    message = first.get("msg", "Invalid request.")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RouterError)
    async def router_error(_: Request, exc: RouterError) -> OrjsonResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> OrjsonResponse:
        message, param = describe_validation_error(exc)
        return error_response(RouterError(400, message, code="invalid_request", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> OrjsonResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(RouterError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> OrjsonResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(RouterError(500, "The router failed to handle the request.", type="server_error"))
