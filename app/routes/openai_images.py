"""`POST /v1/images/generations`: OpenAI's images API over an ordinary promptpix job.

The job is submitted exactly as `POST /v1/generations` submits one (same limits, queue,
ownership, metrics; visible at `/v1/generations/{id}`), then awaited with the asyncio
Redis client: up to PROMPTPIX_SYNC_TIMEOUT seconds as one JSON answer, or as server-sent
events with `stream: true`. A client that disconnects cancels its job.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from worker.protocol import JobRecord, JobStatus, JobStore, Keys, Settings

from .. import imaging
from ..deps import (
    JOB_ID_PATTERN,
    AsyncStoreDep,
    PrincipalDep,
    SettingsDep,
    StoreDep,
    rate_limited,
)
from ..errors import ApiError
from ..jobwatch import (
    FINISHED,
    WATCH_INTERVAL_S,
    get_blob,
    json_of,
    read_job,
    request_redis,
    rows_done,
    set_label,
    url_secret,
)
from ..modelsel import resolve_model_async
from ..openai_compat import (
    ImageGenerationRequest,
    OpenAIErrorResponse,
    OpenAIRoute,
    check_signature,
    openai_error,
    signed_path,
)
from ..schemas import GenerationRequest
from .generations import submit

logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    # "4XX"/"5XX" (OpenAI's shape) also keep FastAPI from documenting its own 422 body:
    # these routes answer invalid requests with 400.
    "4XX": {"model": OpenAIErrorResponse,
            "description": "OpenAI's error shape. 400 invalid field or unsupported size; "
                           "401 missing or unknown key; 403 bad or expired image URL; 404 "
                           "`model_not_found` or image gone; 429 `rate_limited` / "
                           "`queue_full` (Retry-After ≤ 60)"},
    "5XX": {"model": OpenAIErrorResponse,
            "description": "500: the job failed (`code` is its error code); 504: not done "
                           "within PROMPTPIX_SYNC_TIMEOUT, the job goes on (its id is in the "
                           "message); both with x-should-retry: false. 503: Redis down"},
}
router = APIRouter(tags=["openai"], route_class=OpenAIRoute, responses=_ERRORS)


def _generation_request(body: ImageGenerationRequest, model: str) -> GenerationRequest:
    fields = {"prompt": body.prompt, "num_images": body.n, "seed": body.seed, "model": model}
    for name in ("guidance_scale", "temperature", "top_k", "top_p", "class_label"):
        value = getattr(body, name)
        if value is not None:
            fields[name] = value
    try:
        return GenerationRequest.model_validate(fields)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(400, "invalid_request", f"{field}: {err['msg']}", field) from e


def _job_error(job: JobRecord) -> JSONResponse:
    state = job.status.value
    code = job.error_code or ("canceled" if job.status is JobStatus.CANCELED else "failed")
    message = job.error_message or f"job {job.id} ended {state}"
    return openai_error(500, code, f"job {job.id} {state}: {message}", retry=False)


class _Wait:
    """Polls one job with the asyncio client until it ends, the deadline, or a disconnect."""

    def __init__(self, request: Request, job_id: str, timeout: float) -> None:
        self.request, self.job_id = request, job_id
        self.r = request_redis(request)
        self.deadline = time.monotonic() + timeout

    async def poll(self) -> dict[str, str] | None:
        job = await read_job(self.r, self.job_id)
        if job is None:
            raise ApiError(404, "not_found", f"job {self.job_id} expired")
        return job

    @property
    def timed_out(self) -> bool:
        return time.monotonic() >= self.deadline


async def _cancel(store: JobStore, job_id: str) -> None:
    """Cancel a job whose client went away (shielded: runs inside cancelled scopes too)."""
    with anyio.CancelScope(shield=True):
        outcome = await run_in_threadpool(store.cancel, job_id)
    logger.info("job %s: client disconnected; cancel -> %s", job_id, outcome)


async def _images(request: Request, job: JobRecord, body: ImageGenerationRequest,
                  scale: int, settings: Settings) -> list[dict[str, Any]]:
    r = request_redis(request)
    seed = int(job.params["seed"])
    out: list[dict[str, Any]] = []
    if body.response_format == "url":
        secret = await url_secret(request.app)
        base = str(request.base_url).rstrip("/")
        for k in range(job.images):
            path = signed_path(secret, job.id, k, scale, settings.url_ttl)
            out.append({"url": base + path, "revised_prompt": None, "seed": seed + k})
        return out
    for k in range(job.images):
        data = await get_blob(r, Keys.image(job.id, k))
        if data is None:
            raise ApiError(404, "not_found", f"job {job.id}: image {k} expired")
        png = await run_in_threadpool(imaging.enlarge_png, data, scale)
        out.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": None,
                    "seed": seed + k})
    return out


def _image_size(job: JobRecord) -> int:
    return int((job.model or {}).get("image_size") or 0)


@router.post("/v1/images/generations", dependencies=[Depends(rate_limited)],
             responses={200: {"description": "`{created, data: [{b64_json|url, "
                                              "revised_prompt, seed}], output_format, size}`; "
                                              "with stream: text/event-stream",
                              "content": {"application/json": {},
                                          "text/event-stream": {}}}})
async def generate_images(body: ImageGenerationRequest, request: Request,
                          principal: PrincipalDep, store: StoreDep,
                          astore: AsyncStoreDep, settings: SettingsDep) -> Response:
    """OpenAI-compatible generation, for `client.images.generate(...)` of the `openai` SDK.

    A normal job underneath. `quality`, `style`, `background`, `moderation`,
    `output_compression` and `safety_identifier` are accepted and ignored; `user` is
    recorded on the job as a label. Our sampling fields (`seed`, `guidance_scale`,
    `temperature`, `top_k`, `top_p`, `class_label`) come through `extra_body`.
    """
    if body.stream and body.n != 1:
        raise ApiError(400, "invalid_request", "stream supports n=1 only", "n")
    try:
        side = imaging.parse_size(body.size)
    except imaging.SizeError as e:
        raise ApiError(400, "invalid_size", str(e), "size") from e
    model = await resolve_model_async(astore, body.model, 400)
    if "image_size" in model:  # check the size before queueing (unknown model: when it ends)
        try:
            imaging.scale_for(side, int(model["image_size"]))
        except imaging.SizeError as e:
            raise ApiError(400, "invalid_size", str(e), "size") from e
    created = await submit(_generation_request(body, model["id"]), Response(), principal,
                           astore, settings, None)
    if body.user:
        await set_label(request_redis(request), created.id, "user", body.user)
    headers = {"x-promptpix-job-id": created.id}
    wait = _Wait(request, created.id, settings.sync_timeout)
    if body.stream:
        return EventSourceResponse(_stream(wait, body, side, store), headers=headers,
                                   ping=15)
    while True:
        job = await wait.poll()
        if job is not None and job.status in FINISHED:
            break
        if await request.is_disconnected():
            await _cancel(store, created.id)
            return Response(status_code=499)
        if wait.timed_out:
            return openai_error(504, "timeout",
                                f"job {created.id} did not finish within "
                                f"PROMPTPIX_SYNC_TIMEOUT={settings.sync_timeout:g} s; it goes "
                                f"on: fetch it at /v1/generations/{created.id}",
                                headers=headers, retry=False)
        await asyncio.sleep(WATCH_INTERVAL_S)
    if job.status is not JobStatus.SUCCEEDED:
        return _job_error(job)
    size = _image_size(job)
    try:
        scale = imaging.scale_for(side, size)  # the model was unknown at submission
    except imaging.SizeError as e:
        raise ApiError(400, "invalid_size", str(e), "size") from e
    answer = {"created": int(job.created_at), "id": created.id,
              "data": await _images(request, job, body, scale, settings),
              "output_format": "png", "size": f"{size * scale}x{size * scale}"}
    return JSONResponse(answer, headers=headers)


def _event(kind: str, data: dict[str, Any]) -> dict[str, str]:
    return {"event": kind, "data": json_of({"type": kind, **data})}


def _error_event(code: str, message: str) -> dict[str, str]:
    return {"event": "error", "data": json_of({"error": {
        "message": message, "type": "server_error", "param": None, "code": code}})}


async def _stream(wait: _Wait, body: ImageGenerationRequest, side: int | None,
                  store: JobStore) -> AsyncIterator[dict[str, str]]:
    """OpenAI's image streaming events: `image_generation.partial_image` (rows so far, at
    most `partial_images`, spread over the image) then `image_generation.completed`; an
    `error` event (OpenAI's error shape) when the job fails, expires or times out. Closing
    the stream early cancels the job."""
    state = {"sent": 0, "finished": False}
    try:
        async for event in _stream_events(wait, body, side, state):
            yield event
    except (ApiError, imaging.SizeError) as e:
        state["finished"] = True
        code = e.code if isinstance(e, ApiError) else "invalid_size"
        yield _error_event(code, e.message if isinstance(e, ApiError) else str(e))
    finally:
        if not state["finished"]:
            await _cancel(store, wait.job_id)


async def _stream_events(wait: _Wait, body: ImageGenerationRequest, side: int | None,
                         state: dict[str, Any]) -> AsyncIterator[dict[str, str]]:
    common = {"background": "opaque", "output_format": "png", "quality": "auto"}
    while True:
        job = await wait.poll()
        assert job is not None
        size = _image_size(job)
        scale = imaging.scale_for(side, size) if size else 1
        sent = state["sent"]
        threshold = size * (sent + 1) / (body.partial_images + 1)
        if (job.status is JobStatus.RUNNING and sent < body.partial_images
                and job.has_preview and size and threshold <= rows_done(job) < size):
            preview = await get_blob(wait.r, Keys.preview(job.id))
            if preview is not None:
                png = await run_in_threadpool(imaging.partial_png, preview, 0, size, scale)
                yield _event("image_generation.partial_image", {
                    **common, "b64_json": base64.b64encode(png).decode(),
                    "created_at": int(time.time()), "partial_image_index": sent,
                    "size": f"{size * scale}x{size * scale}"})
                state["sent"] = sent + 1
                continue
        if job.status in FINISHED:
            state["finished"] = True
            if job.status is not JobStatus.SUCCEEDED:
                yield {"event": "error", "data": bytes(_job_error(job).body).decode()}
                return
            data = await get_blob(wait.r, Keys.image(job.id, 0))
            if data is None:
                raise ApiError(404, "not_found", f"job {job.id}: its image expired")
            png = await run_in_threadpool(imaging.enlarge_png, data, scale)
            tokens = size * size * int((job.model or {}).get("channels") or 1)
            yield _event("image_generation.completed", {
                **common, "b64_json": base64.b64encode(png).decode(),
                "created_at": int(time.time()), "size": f"{size * scale}x{size * scale}",
                "usage": {"input_tokens": 0, "output_tokens": tokens, "total_tokens": tokens,
                          "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}})
            return
        if wait.timed_out:
            state["finished"] = True  # the job goes on, as with the JSON answer
            yield _error_event("timeout", f"job {wait.job_id} did not finish within "
                                          "PROMPTPIX_SYNC_TIMEOUT; it goes on: fetch it at "
                                          f"/v1/generations/{wait.job_id}")
            return
        await asyncio.sleep(WATCH_INTERVAL_S)


@router.get("/v1/images/files/{job_id}/{n}.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "PNG image"}})
async def signed_image(request: Request, job_id: str, n: int,
                       scale: int = Query(1, ge=1, le=imaging.MAX_SIDE_PX),
                       expires: int = Query(...), sig: str = Query(..., max_length=128)
                       ) -> Response:
    """An image of a `response_format: "url"` answer: no API key, a signed expiring URL."""
    if not re.match(JOB_ID_PATTERN, job_id) or n < 0:
        raise ApiError(404, "not_found", "image not found")
    check_signature(await url_secret(request.app), job_id, n, scale, expires, sig)
    r = request_redis(request)
    data = await get_blob(r, Keys.image(job_id, n))
    if data is None:
        raise ApiError(404, "not_found", "image not found (expired?)")
    png = await run_in_threadpool(imaging.enlarge_png, data, scale)
    max_age = max(0, expires - int(time.time()))
    return Response(png, media_type="image/png",
                    headers={"Cache-Control": f"private, max-age={max_age}"})
