"""The generation routes without FastAPI's per-request machinery.

FastAPI dispatches a request through its routing (a scan of every route), dependency solving, an exit
stack, its exception middleware and a body parse with `json.loads` followed by a validation of the
resulting dict. Profiled at 32 clients, that was about a quarter of the router's CPU per proxied
request (docs/benchmarks.md). The generation routes need none of it: their endpoints take one
request body and the `Request`.

`HotRoutes` serves exactly those routes: it looks the path up in a dict, validates the body with the
route's own pydantic model straight from the bytes (`model_validate_json`: one parse, one validation),
and calls the route's own endpoint function. The routes stay declared with FastAPI, so the OpenAPI
document and the endpoint code are the single source; only the dispatch is different. Every other
path goes on to FastAPI.
"""

from __future__ import annotations

import inspect
import logging
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute, APIRouter
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from modelfleet.server.errors import INVALID_REQUEST, OrjsonResponse, RouterError, error_response, invalid_request

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HotRoute:
    body: type[BaseModel]
    endpoint: typing.Callable[[Any, Request], typing.Awaitable[Any]]


def hot_routes(routers: Iterable[APIRouter]) -> dict[str, HotRoute]:
    """The routers' POST routes whose endpoint is `(body: SomeModel, http_request: Request)`, by path."""
    table: dict[str, HotRoute] = {}
    for route in (route for router in routers for route in router.routes):
        if not isinstance(route, APIRoute) or route.methods != {"POST"} or "{" in route.path:
            continue
        parameters = list(inspect.signature(route.endpoint).parameters.values())
        hints = typing.get_type_hints(route.endpoint)
        if len(parameters) != 2:
            continue
        body, request = (hints.get(parameter.name) for parameter in parameters)
        if inspect.isclass(body) and issubclass(body, BaseModel) and request is Request:
            table[route.path] = HotRoute(body, route.endpoint)
    return table


def json_content(scope: Scope) -> bool:
    """Whether the content-type is application/json or application/<something>+json."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            kind: bytes = value.split(b";", 1)[0].strip().lower()
            return kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))
    return False


def parse(route: HotRoute, scope: Scope, body: bytes) -> BaseModel:
    """The request body as the route's model, or the 400 that says what to fix."""
    if not json_content(scope):
        # As FastAPI does: a browser may send a form or text/plain to any site without asking (no
        # CORS preflight), so a JSON API that took those would take cross-site requests.
        raise INVALID_REQUEST("The request body must be JSON, sent with content-type: application/json.")
    try:
        # Bytes straight to the model, with pydantic's JSON parser: one parse, one validation.
        return route.body.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors(include_url=False)) from None


class HotRoutes:
    """ASGI middleware: serve the generation routes directly; pass everything else to the app."""

    def __init__(self, app: ASGIApp, routes: dict[str, HotRoute], authenticate: Callable[[Request], None]) -> None:
        self.app = app
        self.routes = routes
        # Who is calling, before the body is read: a caller without a key learns nothing, not even
        # what the body should look like (401 before 400). It records the caller on the request.
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        http_request = Request(scope, receive)
        response: Response
        try:
            self.authenticate(http_request)
            request = parse(route, scope, await http_request.body())
            result = await route.endpoint(request, http_request)
            response = result if isinstance(result, Response) else OrjsonResponse(result)
        except RouterError as exc:
            response = error_response(exc, scope["path"])
        except Exception:
            # This layer sits outside FastAPI's error middleware (see RouterApp): the one error format here too.
            logger.exception("unhandled error on %s", scope["path"])
            error = RouterError(500, "The router failed to handle the request.", type="server_error")
            response = error_response(error, scope["path"])
        if isinstance(response, StreamingResponse):
            # Straight to the server. Starlette's own `__call__` would run each stream in a task group
            # with a second task listening for the disconnect, which CancelOnDisconnect already does.
            await response.stream_response(send)
        else:
            await response(scope, receive, send)
