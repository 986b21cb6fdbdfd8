"""Pure ASGI middleware: the body limit (413), the Host check (400) and browser headers."""

from __future__ import annotations

import ipaddress
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

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES,
                 upload_limit: int | None = None,
                 upload_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit or limit  # for `upload_paths` (exact paths)
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = (self.upload_limit if scope.get("path", "").rstrip("/") in self.upload_paths
                 else self.limit)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False  # h11 rejects malformed lengths before we see them
                if too_big:
                    await self._reject(scope, receive, send, limit)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
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
            await self._reject(scope, receive, send, limit)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = error_response(413, "payload_too_large",
                                  f"the body is larger than {limit} bytes",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)


# API.md "Browser headers": the page, /docs and every API answer share one origin.
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "[::1]")


class SecurityHeadersMiddleware:
    """Add the browser security headers to every HTTP response (pure ASGI)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS if n not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # a unix socket's path, say: no rebinding through a browser
    # A dual-stack listener sees IPv4 loopback as ::ffff:127.0.0.1.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _host_name(host_header: str) -> str:
    """The name part of a Host header (`[::1]:8000` -> `[::1]`, `a.b:80` -> `a.b`), lowercased."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostCheckMiddleware:
    """Refuse (400 `invalid_host`) requests whose Host header is not an allowed name.

    Against DNS rebinding: a page from `evil.example` that rebinds its name to 127.0.0.1
    reaches a loopback server with `Host: evil.example`. With `allowed` unset the check
    applies to connections that arrive on a loopback address (the default names are the
    loopback names); a configured list applies to every connection; `*` turns it off.
    """

    def __init__(self, app: ASGIApp, allowed: str | None = None) -> None:
        self.app = app
        self.every_connection = allowed is not None
        names = allowed if allowed is not None else ",".join(LOOPBACK_HOST_NAMES)
        self.allowed = {_host_name(n) for n in names.split(",") if n.strip()}
        self.off = "*" in self.allowed

    def _checked(self, scope: Scope) -> bool:
        if self.off:
            return False
        if self.every_connection:
            return True
        server = scope.get("server")
        return bool(server) and _is_loopback(str(server[0]))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._checked(scope):
            await self.app(scope, receive, send)
            return
        host = ""
        for name, value in scope.get("headers", []):
            if name == b"host":
                host = value.decode("latin-1")
                break
        if _host_name(host) in self.allowed:
            await self.app(scope, receive, send)
            return
        logger.warning("refused Host %r on a loopback connection", host[:100])
        response = error_response(
            400, "invalid_host",
            f"Host {host[:100]!r} is not one this server answers to "
            f"(PROMPTPIX_ALLOWED_HOSTS: {', '.join(sorted(self.allowed))})")
        await response(scope, receive, send)
