"""The API's edge: one pure-ASGI layer for the Host check (400), the body limit (413), the
browser security headers and the request metrics.

One layer rather than four: each wrapper costs a coroutine and a `send` closure per
request, and everything that does not depend on the request is worked out at start-up.
"""

from __future__ import annotations

import ipaddress
import logging
import time

from prometheus_client.metrics import MetricWrapperBase
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.protocol import MAX_BODY_BYTES

from .errors import BODY_TOO_LARGE_SCOPE_KEY, error_response
from .metrics import HTTP_DURATION, HTTP_REQUESTS

logger = logging.getLogger(__name__)

# API.md "Browser headers": the page, /docs and every API answer share one origin.
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_SECURITY_NAMES = frozenset(n for n, _ in SECURITY_HEADERS)
LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "[::1]")


class BodyTooLarge(Exception):
    """Raised from `receive` once a streamed body passes the limit."""


def with_security_headers(message: Message) -> Message:
    """A response start with the security headers the app did not set itself."""
    headers = message.get("headers", [])
    present = {n.lower() for n, _ in headers} & _SECURITY_NAMES
    extra = [(n, v) for n, v in SECURITY_HEADERS if n not in present]
    return {**message, "headers": [*headers, *extra]}


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


class HostPolicy:
    """Which requests the Host check refuses (400 `invalid_host`).

    Against DNS rebinding: a page from `evil.example` that rebinds its name to 127.0.0.1
    reaches a loopback server with `Host: evil.example`. With `allowed` unset the check
    applies to connections that arrive on a loopback address (the default names are the
    loopback names); a configured list applies to every connection; `*` turns it off.
    """

    def __init__(self, allowed: str | None = None) -> None:
        self.every_connection = allowed is not None
        names = allowed if allowed is not None else ",".join(LOOPBACK_HOST_NAMES)
        self.allowed = {_host_name(n) for n in names.split(",") if n.strip()}
        self.off = "*" in self.allowed
        self._loopback: dict[str, bool] = {}  # by listening address: a server has few

    def checked(self, scope: Scope) -> bool:
        """Whether the Host header of this request is checked at all."""
        if self.off:
            return False
        if self.every_connection:
            return True
        server = scope.get("server")
        if not server:
            return False
        address = str(server[0])
        loopback = self._loopback.get(address)
        if loopback is None:
            loopback = self._loopback[address] = _is_loopback(address)
        return loopback

    def refusal(self, host: str) -> Response | None:
        """None when `host` is allowed, else the 400 to answer."""
        if _host_name(host) in self.allowed:
            return None
        logger.warning("refused Host %r on a loopback connection", host[:100])
        return error_response(
            400, "invalid_host",
            f"Host {host[:100]!r} is not one this server answers to "
            f"(PROMPTPIX_ALLOWED_HOSTS: {', '.join(sorted(self.allowed))})")


class EdgeMiddleware:
    """Every HTTP request passes here first: the Host check, then bodies over the limit
    refused by Content-Length up front (else while streaming), the security headers on
    every answer (refusals too), and each request counted and timed by route template
    (never by raw path; the edge's own refusals are not counted).

    A streamed overrun raises inside the app; FastAPI turns that into a 400 which the
    error handlers map back to 413 through a scope flag, and anything that escapes is
    answered here. `upload_limit` applies to `upload_paths` (exact paths).
    """

    def __init__(self, app: ASGIApp, allowed_hosts: str | None = None,
                 limit: int = MAX_BODY_BYTES, upload_limit: int | None = None,
                 upload_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.hosts = HostPolicy(allowed_hosts)
        self.limit = limit
        self.upload_limit = upload_limit or limit
        self.upload_paths = upload_paths
        # The metric children by (method, route, status), so a request does no label lookup.
        self._series: dict[tuple[str, str, int], tuple[MetricWrapperBase, MetricWrapperBase]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def edge_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = with_security_headers(message)
            await send(message)

        status = 0
        host = length = b""
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"content-length":
                length = value
        if self.hosts.checked(scope):
            refusal = self.hosts.refusal(host.decode("latin-1"))
            if refusal is not None:
                await refusal(scope, receive, edge_send)
                return
        limit = self.upload_limit if scope["path"].rstrip("/") in self.upload_paths else self.limit
        if length:
            try:
                too_big = int(length) > limit
            except ValueError:
                too_big = False  # h11 rejects malformed lengths before we see them
            if too_big:
                await _too_large(limit)(scope, receive, edge_send)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    scope[BODY_TOO_LARGE_SCOPE_KEY] = True
                    raise BodyTooLarge()
            return message

        start = time.perf_counter()
        try:
            await self.app(scope, limited_receive, edge_send)
        except BodyTooLarge:
            if status:
                raise
            self._record(scope, 500, start)  # as the app left it
            await _too_large(limit)(scope, receive, edge_send)
            return
        except BaseException:
            self._record(scope, status or 500, start)
            raise
        self._record(scope, status or 500, start)

    def _record(self, scope: Scope, status: int, start: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or (
            "/static" if scope["path"].startswith("/static/") else "unmatched")
        key = (scope["method"], path, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (HTTP_REQUESTS.labels(key[0], path, str(status)),
                                          HTTP_DURATION.labels(path))
        series[0].inc()
        series[1].observe(time.perf_counter() - start)  # type: ignore[attr-defined]


def _too_large(limit: int) -> Response:
    return error_response(413, "payload_too_large", f"the body is larger than {limit} bytes",
                          headers={"Connection": "close"})
