"""OpenAI compatibility pieces: its error shape, the images request body, signed URLs.

Only the `/v1/images/...` routes speak OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`; every other route keeps ours.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import redis
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from worker.protocol import MAX_SEED, storage_full

from .errors import REDIS_RETRY_AFTER_S, STORAGE_FULL_RETRY_AFTER_S, ApiError

logger = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 60  # the SDK does not wait longer than this between retries
MAX_PARTIAL_IMAGES = 3  # OpenAI's own limit
# Our field names (from the shared limit checks) as the client spelled them.
_PARAM_NAMES = {"num_images": "n"}
_TYPES = {400: "invalid_request_error", 401: "authentication_error",
          403: "permission_error", 404: "invalid_request_error", 409: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}
IGNORED = "Accepted for compatibility and ignored."


class OpenAIErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """Every error body of the `/v1/images/...` routes."""

    error: OpenAIErrorDetail


def openai_error(status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None, retry: bool | None = None) -> JSONResponse:
    """A response in OpenAI's error shape. Our 422 is OpenAI's 400; `retry=False` sets
    `x-should-retry: false` so the SDK does not repeat work; Retry-After is capped at 60."""
    status = 400 if status == 422 else status
    out = dict(headers or {})
    if "Retry-After" in out:
        out["Retry-After"] = str(min(MAX_RETRY_AFTER_S, int(out["Retry-After"])))
    if retry is not None:
        out["x-should-retry"] = "true" if retry else "false"
    body = {"error": {"message": message,
                      "type": _TYPES.get(status, "server_error" if status >= 500
                                         else "invalid_request_error"),
                      "param": _PARAM_NAMES.get(param or "", param), "code": code}}
    return JSONResponse(body, status_code=status, headers=out)


def _param_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


class OpenAIRoute(APIRoute):
    """An APIRoute whose errors (auth, limits, validation, Redis) use OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                return openai_error(e.status, e.code, e.message, e.field, e.headers)
            except RequestValidationError as e:
                errors = list(e.errors())
                first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
                kind = first.get("type", "")
                message = ("unrecognized request argument" if kind == "extra_forbidden"
                           else "the body is not valid JSON" if kind == "json_invalid"
                           else str(first.get("msg", "invalid value")))
                param = _param_of(tuple(first.get("loc", ())))
                return openai_error(400, "invalid_request", f"{param or 'body'}: {message}",
                                    param)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                logger.warning("Redis unavailable for %s: %s", request.url.path, e)
                return openai_error(503, "unavailable", "the job store (Redis) is unreachable",
                                    headers={"Retry-After": str(REDIS_RETRY_AFTER_S)})
            except redis.ResponseError as e:
                if not storage_full(e):
                    raise
                logger.warning("Redis is full: refused %s: %s", request.url.path, e)
                return openai_error(503, "storage_full", "the job store (Redis) is full; "
                                    "retry later",
                                    headers={"Retry-After": str(STORAGE_FULL_RETRY_AFTER_S)})

        return wrapped


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`: what `client.images.generate(...)` sends, plus our
    sampling fields (through the SDK's `extra_body`). Unknown fields are 400."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=(),
                              json_schema_extra={"examples": [{
                                  "prompt": "a red circle on a white background",
                                  "model": "shapes16", "n": 1, "size": "64x64",
                                  "response_format": "b64_json", "seed": 7}]})

    prompt: str = Field(min_length=1)
    model: str | None = Field(None, description="a model id or an alias from "
                              "PROMPTPIX_MODEL_ALIASES; null = the served model")
    n: int = Field(1, ge=1, description="images (at most PROMPTPIX_MAX_IMAGES)")
    size: str | None = Field(None, description='"auto", the model\'s own ("16x16"), or a '
                             "square multiple of it (nearest-neighbour enlargement)")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json (default) or a signed URL that expires after "
        "PROMPTPIX_URL_TTL seconds and needs no API key")
    output_format: Literal["png"] | None = Field(None, description="png only")
    stream: bool = Field(False, description="server-sent events (n must be 1)")
    partial_images: int = Field(0, ge=0, le=MAX_PARTIAL_IMAGES,
                                description="partial images streamed before the final one")
    user: str | None = Field(None, max_length=256,
                             description="recorded on the job as a label, never as its owner")
    quality: str | None = Field(None, description=IGNORED)
    style: str | None = Field(None, description=IGNORED)
    background: str | None = Field(None, description=IGNORED + " Images are opaque.")
    moderation: str | None = Field(None, description=IGNORED + " Nothing is moderated.")
    output_compression: int | None = Field(None, description=IGNORED + " (PNG only)")
    safety_identifier: str | None = Field(None, max_length=256, description=IGNORED)
    # Ours, through extra_body; bounds checked as on POST /v1/generations.
    seed: int | None = Field(None, ge=0, lt=MAX_SEED, description="null = drawn; image k "
                             "uses seed + k")
    guidance_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    class_label: int | None = None


def sign(secret: bytes, job_id: str, n: int, scale: int, expires: int) -> str:
    """HMAC-SHA256 of one image URL's facts (hex)."""
    msg = f"{job_id}/{n}/{scale}/{expires}".encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def signed_path(secret: bytes, job_id: str, n: int, scale: int, ttl: int,
                now: float | None = None) -> str:
    """Path and query of a signed, expiring image URL (no key needed to GET it)."""
    expires = int(now if now is not None else time.time()) + ttl
    sig = sign(secret, job_id, n, scale, expires)
    return f"/v1/images/files/{job_id}/{n}.png?scale={scale}&expires={expires}&sig={sig}"


def check_signature(secret: bytes, job_id: str, n: int, scale: int, expires: int,
                    sig: str, now: float | None = None) -> None:
    """Raise 403 when the signature is wrong or the URL expired."""
    good = sign(secret, job_id, n, scale, expires)
    if not hmac.compare_digest(good.encode(), sig.encode()):  # bytes: `sig` may be non-ASCII
        raise ApiError(403, "invalid_signature", "the image URL's signature is not valid")
    if (now if now is not None else time.time()) > expires:
        raise ApiError(403, "url_expired", "the image URL expired; generate it again")
