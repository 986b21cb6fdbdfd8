"""One error shape for every failure: `{"error": {"code", "message", "field"?}}`.

FastAPI's own bodies (`{"detail": ...}`) never reach a client: validation errors, unknown
routes, unparseable bodies and Redis outages are all mapped here.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.protocol import MAX_BODY_BYTES, storage_full

logger = logging.getLogger(__name__)

BODY_TOO_LARGE_SCOPE_KEY = "promptpix.body_too_large"
REDIS_RETRY_AFTER_S = 5
STORAGE_FULL_RETRY_AFTER_S = 30


class ErrorDetail(BaseModel):
    """What went wrong: a stable `code`, a human `message`, the offending `field` if any."""

    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """Every error body."""

    error: ErrorDetail


def _doc(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# Declared on every /v1 route; declaring 422 also stops FastAPI adding its own schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _doc("Missing or unknown API key (`unauthorized`)"),
    404: _doc("Unknown, expired or another key's job (`not_found`)"),
    413: _doc("Body over 64 KiB (`payload_too_large`)"),
    422: _doc("Invalid field, malformed JSON or wrong content type (`invalid_request`)"),
    429: _doc("`rate_limited`, `queue_full` or `quota_exceeded`; see Retry-After"),
    503: _doc("Redis unreachable (`unavailable`); see Retry-After"),
}


class ApiError(Exception):
    """An error answered to the client as-is (raised only at the API edge)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSONResponse in the error shape (`field` left out when None)."""
    detail = ErrorDetail(code=code, message=message, field=field)
    return JSONResponse({"error": detail.model_dump(exclude_none=True)}, status_code=status,
                        headers=headers)


def not_found(what: str = "job") -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def _field_path(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or None


def _validation_message(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "the body is not valid JSON"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind in ("model_attributes_type", "dict_type", "model_type") and len(err["loc"]) <= 1:
        return "the body must be a JSON object sent as Content-Type: application/json"
    if kind == "finite_number":
        return "must be a finite number"
    return str(err.get("msg", "invalid value"))


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = None if first.get("type") == "json_invalid" else _field_path(tuple(first["loc"]))
    message = _validation_message(first)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(422, "invalid_request", message, field)


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


_HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "invalid_request"}


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if request.scope.get(BODY_TOO_LARGE_SCOPE_KEY):
        return error_response(413, "payload_too_large",
                              f"the body is larger than {MAX_BODY_BYTES} bytes")
    if exc.status_code == 400:
        # FastAPI's "error parsing the body" (e.g. bytes that are not UTF-8): client input.
        return error_response(422, "invalid_request", "the body could not be decoded as JSON text")
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _on_redis_down(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("Redis unavailable for %s %s: %s", request.method, request.url.path, exc)
    return error_response(503, "unavailable", "the job store (Redis) is unreachable; retry later",
                          headers={"Retry-After": str(REDIS_RETRY_AFTER_S)})


async def _on_redis_error(request: Request, exc: Exception) -> JSONResponse:
    if storage_full(exc):
        logger.warning("Redis is full: refused %s %s: %s", request.method, request.url.path, exc)
        return error_response(503, "storage_full",
                              "the job store (Redis) is full; retry later",
                              headers={"Retry-After": str(STORAGE_FULL_RETRY_AFTER_S)})
    return await _on_unexpected(request, exc)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that map every failure to the error shape."""
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, _on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(redis.ConnectionError, _on_redis_down)
    app.add_exception_handler(redis.TimeoutError, _on_redis_down)
    app.add_exception_handler(redis.ResponseError, _on_redis_error)
    app.add_exception_handler(Exception, _on_unexpected)
