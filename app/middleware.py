"""Pure ASGI middleware: the 64 KiB request body limit (413 `payload_too_large`)."""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.protocol import MAX_BODY_BYTES

from .errors import BODY_TOO_LARGE_SCOPE_KEY, error_response

logger = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    """Raised from `receive` once a streamed body passes the limit."""


class BodyLimitMiddleware:
    """Refuse bodies over `limit` bytes: by Content-Length up front, else while streaming.

    A streamed overrun raises inside the app; FastAPI turns that into a 400 which the
    error handlers map back to 413 through a scope flag, and anything that escapes is
    answered here.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False  # h11 rejects malformed lengths before we see them
                if too_big:
                    await self._reject(scope, receive, send)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    scope[BODY_TOO_LARGE_SCOPE_KEY] = True
                    raise BodyTooLarge()
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, send_wrapper)
        except BodyTooLarge:
            if started:
                raise
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "payload_too_large",
                                  f"the body is larger than {self.limit} bytes",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)
