"""Cancel a request's work the moment its client disconnects.

ASGI servers do not cancel a handler when the client goes away; the app only learns of it by
reading `http.disconnect` from `receive()`, and a handler that is awaiting a backend (a request
waiting for its answer, or a stream waiting for the backend's first bytes) never reads it.  The
backend would go on generating for nobody while the request holds its slot.

This middleware reads the request body, then watches `receive()` for the disconnect and cancels
the request's task.  The cancellation unwinds the handler like any other: the queue slot is
released and the upstream connection closed, which is what stops the backend's generation.
"""

from __future__ import annotations

import asyncio
from collections import deque

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class CancelOnDisconnect:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body: deque[Message] = deque()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body arrived: there is no one to answer
            body.append(message)
            if not message.get("more_body", False):
                break

        request_task = asyncio.current_task()
        assert request_task is not None
        client_left = asyncio.Event()
        responded = False

        async def app_receive() -> Message:
            if body:
                return body.popleft()
            await client_left.wait()
            return {"type": "http.disconnect"}

        async def app_send(message: Message) -> None:
            nonlocal responded
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                responded = True
            await send(message)

        async def watch() -> None:
            # After the body, the server's next message is http.disconnect: the client left, or
            # the response is complete (then there is nothing to cancel).
            await receive()
            client_left.set()
            if not responded:
                request_task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await self.app(scope, app_receive, app_send)
        except asyncio.CancelledError:
            # Swallow only our own cancellation; the server's (shutdown) must propagate.
            if client_left.is_set() and request_task.uncancel() == 0:
                return
            raise
        finally:
            watcher.cancel()
