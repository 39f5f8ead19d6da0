"""The router's error format: OpenAI's `{"error": {"message", "type", "param", "code"}}`, and on the Anthropic
Messages API's paths (/v1/messages...) Anthropic's `{"type": "error", "error": {"type", "message"}}`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

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


class PlainRefusal(RouterError):
    """A backend's 4xx without a JSON error body: its web server's own, such as a 404 for a path it lacks."""


@dataclass(frozen=True)
class ErrorCode:
    """One kind of error the router answers: its `code`, HTTP status and OpenAI `type`, and what it tells a
    client. Every error is raised through one of these (`MODEL_NOT_FOUND(message)`), and the table
    of errors in docs/router.md is generated from ERROR_CODES (`python -m hack.errors_doc`)."""

    code: str
    status: int
    error_type: str  # OpenAI's `type`
    meaning: str

    def __call__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
        kind: type[RouterError] = RouterError,
    ) -> RouterError:
        return kind(status or self.status, message, type=self.error_type, code=self.code, param=param, headers=headers)


INVALID = "invalid_request_error"
INVALID_REQUEST = ErrorCode("invalid_request", 400, INVALID, "The body is not JSON, not an object, or a field has a "
                            "wrong type or value; `param` names the field.")  # fmt: skip
MODEL_REQUIRED = ErrorCode("model_required", 400, INVALID, "No `model`, and the router serves several with no default.")
MAX_TOKENS_EXCEEDED = ErrorCode("max_tokens_exceeded", 400, INVALID, "`max_tokens` is above the router's cap "
                                "(`MODELFLEET_MAX_TOKENS_CAP`).")  # fmt: skip
PROMPT_TOO_LONG = ErrorCode("prompt_too_long", 400, INVALID, "The prompt has more characters than "
                            "`MODELFLEET_MAX_PROMPT_CHARS`.")  # fmt: skip
INVALID_PRIORITY = ErrorCode("invalid_priority", 400, INVALID, "`X-ModelFleet-Priority` is neither `interactive` "
                             "nor `batch`.")  # fmt: skip
TOKENS_EXCEED_LIMIT = ErrorCode("tokens_exceed_limit", 400, INVALID, "The request could never fit the key's token "
                                "budget (its prompt plus `max_tokens`): lower `max_tokens`, do not "
                                "retry.")  # fmt: skip
UNSUPPORTED_PARAMETER = ErrorCode("unsupported_parameter", 400, INVALID, "The model's backend cannot honour a "
                                  "field (e.g. `tool_choice: required` on Ollama's native API).")  # fmt: skip
MODEL_AUTOSCALED = ErrorCode("model_autoscaled", 400, INVALID, "A load asked for `replicas` of a model whose "
                             "replicas the autoscaler sets.")  # fmt: skip
MISSING_API_KEY = ErrorCode("missing_api_key", 401, "authentication_error", "No API key: send `Authorization: "
                            "Bearer <key>` or `X-API-Key: <key>` (an admin key for admin endpoints).")  # fmt: skip
INVALID_API_KEY = ErrorCode("invalid_api_key", 401, "authentication_error", "The API key is not one the router knows.")
ADMIN_REQUIRED = ErrorCode("admin_required", 403, "permission_error", "An admin endpoint called with a user key.")
REMOTE_NOT_ALLOWED = ErrorCode("remote_not_allowed", 403, "permission_error", "The model is served by a remote "
                               "provider, and the request did not set `allow_remote: true`.")  # fmt: skip
MODEL_NOT_FOUND = ErrorCode("model_not_found", 404, "not_found_error", "No model of that name (or it was removed "
                            "while the request waited for it).")  # fmt: skip
MODEL_NOT_MANAGED = ErrorCode("model_not_managed", 409, INVALID, "Load or unload of a model the operator does not "
                              "run (static, or an existing endpoint), or by a router that does not watch the "
                              "cluster.")  # fmt: skip
SCALE_REFUSED = ErrorCode("scale_refused", 409, INVALID, "The Kubernetes API server refused a load or unload.")
RATE_LIMIT_REQUESTS = ErrorCode("rate_limit_requests", 429, "rate_limit_error", "The key's requests per minute "
                                "for the model are used up; `retry-after` says when to retry.")  # fmt: skip
RATE_LIMIT_TOKENS = ErrorCode("rate_limit_tokens", 429, "rate_limit_error", "The key's tokens per minute for the "
                              "model are used up; `retry-after` says when to retry.")  # fmt: skip
QUEUE_FULL = ErrorCode("queue_full", 429, "rate_limit_error", "The model's queue is full (`maxQueue`); "
                       "`retry-after` comes from recent request durations.")  # fmt: skip
QUEUE_DEADLINE = ErrorCode("queue_deadline", 429, "rate_limit_error", "The work ahead in the queue would not let "
                           "the request start before its deadline; refused at once, not after the "
                           "wait.")  # fmt: skip
UPSTREAM_REJECTED = ErrorCode("upstream_rejected", 400, INVALID, "The model server refused the request: its own "
                              "4xx status and message are passed on.")  # fmt: skip
UPSTREAM_ERROR = ErrorCode("upstream_error", 502, "upstream_error", "The model server failed (a 5xx, or a stream "
                           "that broke; mid-stream, an SSE error event and `[DONE]`).")  # fmt: skip
UPSTREAM_UNAVAILABLE = ErrorCode("upstream_unavailable", 502, "upstream_error", "No replica of the model accepts a "
                                 "connection.")  # fmt: skip
KUBERNETES_FORBIDDEN = ErrorCode("kubernetes_forbidden", 502, "server_error", "The router's ServiceAccount may not "
                                 "scale the model (`patch` on `inferencemodels/scale`).")  # fmt: skip
KUBERNETES_ERROR = ErrorCode("kubernetes_error", 502, "server_error", "The Kubernetes API server failed a load or "
                             "unload.")  # fmt: skip
NO_READY_REPLICA = ErrorCode("no_ready_replica", 503, "upstream_error", "The model has no ready replica that "
                             "answers.")  # fmt: skip
MODEL_UNLOADED = ErrorCode("model_unloaded", 503, "server_error", "The model is unloaded (`spec.replicas: 0`); an "
                           "admin can load it.")  # fmt: skip
RATE_LIMITER_UNAVAILABLE = ErrorCode("rate_limiter_unavailable", 503, "server_error", "Redis is down and the "
                                     "limiter fails closed; `retry-after: 1`.")  # fmt: skip
KUBERNETES_UNAVAILABLE = ErrorCode("kubernetes_unavailable", 503, "server_error", "The Kubernetes API server "
                                   "cannot be reached for a load or unload.")  # fmt: skip
QUEUE_TIMEOUT = ErrorCode("queue_timeout", 504, "timeout_error", "No slot within the model's "
                          "`requestTimeoutSeconds`.")  # fmt: skip
MESSAGES_UNSUPPORTED = ErrorCode("messages_unsupported", 400, INVALID, "The model's backend does not serve the "
                                 "Anthropic Messages API (`/v1/messages`); the router does not translate it to chat "
                                 "completions: use `/v1/chat/completions` for this model.")  # fmt: skip
COUNT_TOKENS_UNSUPPORTED = ErrorCode("count_tokens_unsupported", 404, "not_found_error", "The model's backend does "
                                     "not count tokens (`/v1/messages/count_tokens`; Ollama has no such endpoint), "
                                     "and the router does not guess a count.")  # fmt: skip
UPSTREAM_TIMEOUT = ErrorCode("upstream_timeout", 504, "upstream_error", "The model server was silent for "
                             "`MODELFLEET_UPSTREAM_TIMEOUT_SECONDS` (mid-stream: an SSE error event).")  # fmt: skip

ERROR_CODES = (
    INVALID_REQUEST, MODEL_REQUIRED, MAX_TOKENS_EXCEEDED, PROMPT_TOO_LONG, INVALID_PRIORITY, TOKENS_EXCEED_LIMIT,
    UNSUPPORTED_PARAMETER, MODEL_AUTOSCALED, MISSING_API_KEY, INVALID_API_KEY, ADMIN_REQUIRED, REMOTE_NOT_ALLOWED,
    MODEL_NOT_FOUND, MODEL_NOT_MANAGED, SCALE_REFUSED, RATE_LIMIT_REQUESTS, RATE_LIMIT_TOKENS, QUEUE_FULL,
    QUEUE_DEADLINE, UPSTREAM_REJECTED, UPSTREAM_ERROR, UPSTREAM_UNAVAILABLE, KUBERNETES_FORBIDDEN, KUBERNETES_ERROR,
    NO_READY_REPLICA, MODEL_UNLOADED, RATE_LIMITER_UNAVAILABLE, KUBERNETES_UNAVAILABLE, QUEUE_TIMEOUT,
    UPSTREAM_TIMEOUT, MESSAGES_UNSUPPORTED, COUNT_TOKENS_UNSUPPORTED,
)  # fmt: skip


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


class AnthropicErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    message: str


class AnthropicErrorBody(BaseModel):
    """The body of every error on the Anthropic Messages API's paths (documentation only)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["error"]
    error: AnthropicErrorDetail


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


def error_responses(*statuses: int | str, body: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting `statuses` with the error body (OpenAI's by default)."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": body, "description": ERROR_STATUSES[status]}
        if status == 429:
            responses[status]["headers"] = RETRY_AFTER
    return responses


# Every route that runs a generation: request validation, auth, model lookup, limits, queue and backend.
GENERATION_ERRORS = error_responses(400, 401, 403, 404, 413, 429, 502, 503, 504, "4XX")
# The same, in Anthropic's shape, on /v1/messages.
MESSAGES_ERRORS = error_responses(400, 401, 403, 404, 413, 429, 502, 503, 504, "4XX", body=AnthropicErrorBody)


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: RouterError, path: str = "") -> OrjsonResponse:
    """The error as a response, in the shape of the API its path belongs to."""
    body = anthropic_error_body(error) if anthropic_path(path) else error_body(error.message, error.type, error.code,
                                                                               error.param)  # fmt: skip
    return OrjsonResponse(body, status_code=error.status, headers=error.headers)


# The Anthropic Messages API's paths: their errors have Anthropic's shape, which its clients parse.
ANTHROPIC_PATH = "/v1/messages"


def anthropic_path(path: str) -> bool:
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


# Anthropic's error `type` by HTTP status (its documented pairs); any other 4xx is an invalid request,
# any other 5xx an api_error.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    return ANTHROPIC_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def anthropic_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """Anthropic's error shape; the router's own `code` is kept in the message, where a person reads it."""
    detail = f"{message} ({code})" if code else message
    return {"type": "error", "error": {"type": anthropic_error_type(status), "message": detail}}


def anthropic_error_body(error: RouterError) -> dict[str, Any]:
    return anthropic_body(error.status, error.message, error.code)


def path_error_body(path: str, status: int, message: str, type: str, code: str | None = None) -> dict[str, Any]:
    """An error body in the shape of the API `path` belongs to (for the ASGI layers, below FastAPI's handlers)."""
    return anthropic_body(status, message, code) if anthropic_path(path) else error_body(message, type, code)


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
    return INVALID_REQUEST(message, param=param)


FRAMEWORK_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RouterError)
    async def router_error(request: Request, exc: RouterError) -> OrjsonResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> OrjsonResponse:
        return error_response(invalid_request(exc.errors()), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> OrjsonResponse:
        # The framework's own refusals: an unknown path, a wrong method, a body it could not parse
        # (e.g. an integer of more than 4300 digits).
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = FRAMEWORK_CODES.get(exc.status_code)
        return error_response(RouterError(exc.status_code, str(exc.detail), type=kind, code=code), request.url.path)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> OrjsonResponse:
        logger.exception("unhandled error", exc_info=exc)
        error = RouterError(500, "The router failed to handle the request.", type="server_error")
        return error_response(error, request.url.path)
