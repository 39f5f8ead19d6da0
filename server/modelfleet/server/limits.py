"""ASGI middleware that refuses oversized request bodies before the app reads them."""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelfleet.server.errors import path_error_body


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.refuse(scope, send)
            return
        # A chunked body has no length to check up front: read it here, within the limit, and hand
        # the app one message. Raising from inside the app's receive() would surface as the
        # framework's own 400 "error parsing the body" instead of our 413.
        parts: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left before sending its body; the app will see the disconnect
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await self.refuse(scope, send)
                return
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()  # later calls wait for the client to disconnect, as before

        await self.app(scope, replay, send)

    async def refuse(self, scope: Scope, send: Send) -> None:
        message = f"The request body exceeds {self.max_bytes} bytes."
        body = orjson.dumps(path_error_body(scope["path"], 413, message, "invalid_request_error", "body_too_large"))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
