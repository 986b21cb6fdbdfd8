"""`/v1/generations`: submit, poll, cancel, fetch PNGs and the live preview."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Depends, Request, Response, status
from pydantic import BaseModel

from worker.protocol import (
    MAX_BEST_OF_FACTOR,
    MAX_SEED,
    GenerationParams,
    IdempotencyConflict,
    JobRecord,
    JobStatus,
    Keys,
    QueueFull,
    QuotaExceeded,
    Settings,
    canonical_json,
)

from ..deps import (
    AsyncStoreDep,
    JobDep,
    JobIdPath,
    PrincipalDep,
    SettingsDep,
    StoreDep,
    job_status,
    rate_limited,
)
from ..errors import ERROR_RESPONSES, ApiError, ErrorResponse, not_found
from ..imaging import decode_upload
from ..jobwatch import request_redis
from ..metrics import JOBS_SUBMITTED
from ..modelsel import check_class_label, resolve_model_async
from ..schemas import GenerationRequest, JobCreated, JobErrorOut, JobModel, JobView
from ..store_async import AsyncStore
from ..waiting import prefer_wait, wait_until_finished
from ..webhook_policy import webhook_for, webhook_status

logger = logging.getLogger(__name__)

PREFIX = "/v1/generations"
UPLOAD_PATHS = frozenset({PREFIX})  # init_image: body limit PROMPTPIX_MAX_UPLOAD_BYTES
QUEUE_FULL_RETRY_AFTER_S = 5
MAX_IDEMPOTENCY_KEY_CHARS = 255

router = APIRouter(prefix=PREFIX, tags=["generations"], responses=ERROR_RESPONSES,
                   dependencies=[Depends(rate_limited)])


def iso(ts: float | None) -> str | None:
    """A stored unix time as ISO 8601 UTC (None for unset)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def job_view(job: JobRecord, store: StoreDep) -> JobView:
    """The public view of a stored job (reads its queue position)."""
    return view_at(job, store.queue_position(job) if job.status is JobStatus.QUEUED else None)


def view_at(job: JobRecord, position: int | None) -> JobView:
    """The public view of a stored job at queue `position` (None: not in the queue)."""
    state = job.status
    params = dict(job.params)
    prompt = params.pop("prompt")
    if state is JobStatus.QUEUED and position is None:
        position = 0  # just taken by a worker, not yet marked running
    n_images = job.images if state is JobStatus.SUCCEEDED else 0
    error = (JobErrorOut(code=job.error_code, message=job.error_message)
             if job.error_code else None)
    return JobView(
        id=job.id, status=state.value, attempt=job.attempt, progress=job.progress,
        queue_position=position, prompt=prompt, params=params,
        model=JobModel(**job.model) if job.model else None,
        created_at=iso(job.created_at) or "", started_at=iso(job.started_at),
        finished_at=iso(job.finished_at),
        images=[f"{PREFIX}/{job.id}/images/{n}.png" for n in range(n_images)],
        image_bits_per_dim=(job.result.get("image_bits_per_dim")
                            if n_images and isinstance(job.result, dict) else None),
        preview_url=f"{PREFIX}/{job.id}/preview.png" if job.has_preview else None,
        error=error, user=job.user, webhook=webhook_status(job),
        keep_rows=params.get("keep_rows"), has_init_image=bool(params.get("has_init_image")),
    )


async def _check_limits(body: GenerationRequest, settings: SettingsDep,
                        astore: AsyncStoreDep) -> GenerationRequest:
    """Check the request against the settings and its model's facts; return it with its
    model resolved (aliases, the default)."""
    if len(body.prompt) > settings.max_prompt_chars:
        raise ApiError(422, "invalid_request",
                       f"prompt is longer than {settings.max_prompt_chars} characters", "prompt")
    if body.num_images > settings.max_images:
        raise ApiError(422, "invalid_request",
                       f"num_images must be at most {settings.max_images}", "num_images")
    if body.best_of is not None:
        top = min(MAX_BEST_OF_FACTOR * body.num_images, settings.max_images)
        if not body.num_images <= body.best_of <= top:
            raise ApiError(422, "invalid_request",
                           f"best_of must be {body.num_images}..{top} (num_images to "
                           f"{MAX_BEST_OF_FACTOR}x num_images, at most PROMPTPIX_MAX_IMAGES="
                           f"{settings.max_images}), got {body.best_of}", "best_of")
    if body.negative_prompt and len(body.negative_prompt) > settings.max_prompt_chars:
        raise ApiError(422, "invalid_request", "negative_prompt is longer than "
                       f"{settings.max_prompt_chars} characters", "negative_prompt")
    if (body.keep_rows is None) != (body.init_image is None):
        field = "init_image" if body.init_image is None else "keep_rows"
        raise ApiError(422, "invalid_request", "init_image and keep_rows go together "
                       f"(completion); {field} is missing", field)
    model = await resolve_model_async(astore, body.model)
    check_class_label(model, body.class_label)
    rows = model.get("image_size")
    if body.keep_rows is not None and rows and not body.keep_rows < int(rows):
        raise ApiError(422, "invalid_request", f"keep_rows must be 1..{int(rows) - 1} for "
                       f"model {model['id']!r} ({rows} rows), got {body.keep_rows}",
                       "keep_rows")
    return body.model_copy(update={"model": model["id"]})


_WAIT_DOC = ("`Prefer: wait=N` (N <= 60): the finished job view (200) when the job ends "
             "within N seconds, else the usual 202")


def _optional_header(name: str, description: str | None = None) -> dict[str, Any]:
    """An optional string header as FastAPI documents a `Header()` parameter."""
    schema: dict[str, Any] = {"anyOf": [{"type": "string"}, {"type": "null"}],
                              "title": name.title()}
    if description:
        schema["description"] = description
    return {"in": "header", "name": name, "required": False, "schema": schema,
            **({"description": description} if description else {})}


_SUBMIT_HEADERS = {"parameters": [_optional_header("Idempotency-Key"),
                                  _optional_header("prefer", _WAIT_DOC)]}


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobCreated,
             operation_id="submit_v1_generations_post", openapi_extra=_SUBMIT_HEADERS,
             responses={200: {"model": JobView | JobCreated,
                              "description": "Repeated Idempotency-Key (JobCreated), or "
                              "the finished job under " + _WAIT_DOC},
                        409: {"model": ErrorResponse,
                              "description": "`idempotency_conflict`"},
                        503: {"model": ErrorResponse, "description": "Redis unreachable "
                              "(`unavailable`) or full (`storage_full`); see Retry-After"}})
async def post_generation(body: GenerationRequest, request: Request, response: Response,
                          principal: PrincipalDep) -> Response:
    """Queue a generation job; poll `status_url` for progress and images."""
    # The stores from the app's state and the headers from the request (documented by
    # `_SUBMIT_HEADERS`) rather than as FastAPI dependencies and parameters: the
    # submission every client makes skips FastAPI's cost for each.
    astore: AsyncStore = request.app.state.astore
    settings: Settings = request.app.state.settings
    created = await submit(body, response, principal, astore, settings,
                           request.headers.get("idempotency-key"))
    return await answer_after_wait(request, created, response,
                                   lambda: status_view(created.id, principal, astore))


async def status_view(job_id: str, principal: PrincipalDep, astore: AsyncStoreDep) -> JobView:
    """The caller's generation job as `GET /v1/generations/{id}` shows it (404 otherwise)."""
    return view_at(*await job_status(job_id, principal, astore))


async def answer_after_wait(
        request: Request, created: JobCreated, response: Response,
        view: Callable[[], Awaitable[BaseModel]]) -> Response:
    """The submission's answer: with `Prefer: wait=N`, the finished view (200) when the job
    ended in time; otherwise `created` (202, or 200 for a repeated Idempotency-Key, with
    the headers `response` holds), serialised once (a returned model would be validated
    again against the route's `response_model`)."""
    seconds = prefer_wait(request)
    if seconds and await wait_until_finished(request_redis(request), created.id, seconds):
        try:
            finished = await view()
        except ApiError:  # expired meanwhile (only with a tiny RESULT_TTL)
            return _json(created, response.status_code or status.HTTP_202_ACCEPTED,
                         response.headers)
        return _json(finished, status.HTTP_200_OK,
                     {"Location": created.status_url, "Preference-Applied": f"wait={seconds}"})
    return _json(created, response.status_code or status.HTTP_202_ACCEPTED, response.headers)


def _json(model: BaseModel, code: int, headers: Mapping[str, str]) -> Response:
    return Response(model.model_dump_json(), status_code=code, headers=dict(headers),
                    media_type="application/json")


def idempotency(key: str | None, requested: dict[str, Any],
                scope: str) -> tuple[str, str] | None:
    """The Idempotency-Key's Redis key and the request's body hash (None without a key)."""
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise ApiError(422, "invalid_request",
                       f"Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY_CHARS} characters",
                       "Idempotency-Key")
    body_hash = hashlib.sha256(canonical_json(requested).encode()).hexdigest()
    return Keys.idempotency(scope, key), body_hash


async def admit(astore: AsyncStoreDep, params: Any, principal: PrincipalDep,
                idem: tuple[str, str] | None, **extra: Any) -> tuple[JobRecord, bool]:
    """Create a job of any kind in one Redis step (Idempotency-Key lookup, then MAX_QUEUE
    and the caller's cap, then the job and its RQ entry); (job, created). Refusals as API
    errors."""
    retry_after = {"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)}
    try:
        job, created = await astore.create_job(params, owner=principal.owner,
                                               idempotency=idem, quota_who=principal.who,
                                               **extra)
    except IdempotencyConflict as e:
        raise ApiError(409, "idempotency_conflict",
                       "this Idempotency-Key was used with a different body") from e
    except QueueFull as e:
        raise ApiError(429, "queue_full", str(e), headers=retry_after) from e
    except QuotaExceeded as e:
        raise ApiError(429, "quota_exceeded", str(e), headers=retry_after) from e
    except LookupError:  # the earlier job expired meanwhile: only with a tiny RESULT_TTL
        raise not_found() from None
    if created:
        JOBS_SUBMITTED.inc()
    return job, created


async def submit(body: GenerationRequest, response: Response, principal: PrincipalDep,
                 astore: AsyncStoreDep, settings: SettingsDep,
                 idempotency_key: str | None = None) -> JobCreated:
    """Admit a generation job; the answer without any wait."""
    requested = body.model_dump()
    body = await _check_limits(body, settings, astore)
    idem = idempotency(idempotency_key, requested, principal.owner or "global")
    webhook = webhook_for(body, settings)
    upload = None if body.init_image is None else decode_upload(body.init_image, "init_image")
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
    params = GenerationParams(**{**body.job_fields(), "seed": seed})
    job, created = await admit(astore, params, principal, idem, webhook=webhook, upload=upload)
    if not created:
        response.status_code = status.HTTP_200_OK
    url = f"{PREFIX}/{job.id}"
    response.headers["Location"] = url
    return JobCreated(id=job.id, status=job.status.value, created_at=iso(job.created_at) or "",
                      status_url=url, seed=int(job.params["seed"]))


@router.get("/{job_id}", response_model=JobView)
async def get_job(job_id: JobIdPath, principal: PrincipalDep, request: Request) -> Response:
    """Status, progress, queue position and, when done, the image URLs."""
    # The poll every client repeats: one round trip on the event loop (no thread-pool
    # hop), the store from the app's state (one dependency less), and the view serialised
    # once (a returned model would be validated again).
    view = await status_view(job_id, principal, request.app.state.astore)
    return Response(view.model_dump_json(), media_type="application/json")


@router.delete("/{job_id}", response_model=JobView,
               responses={409: {"model": ErrorResponse,
                                "description": "`not_cancelable`"}})
def cancel_job(job: JobDep, store: StoreDep) -> JobView:
    """Cancel: a queued job never runs; a running job stops within one row."""
    return job_view(cancel(job, store), store)


def cancel(job: JobRecord, store: StoreDep) -> JobRecord:
    """Cancel a job of any kind and read it back: 404 when it is gone, 409
    `not_cancelable` when it already ended."""
    outcome = store.cancel(job.id)
    if outcome == "missing":
        raise not_found()
    if outcome != "ok":
        raise ApiError(409, "not_cancelable", f"the job already ended ({outcome})")
    fresh = store.get(job.id)
    if fresh is None:
        raise not_found()
    return fresh


_PNG = {200: {"content": {"image/png": {}}, "description": "PNG image"}}


@router.get("/{job_id}/images/{n}.png", response_class=Response, responses=_PNG)
def get_image(job: JobDep, n: int, store: StoreDep) -> Response:
    """Image `n` (from 0) of a succeeded job, with prompt, seed, params and model id inside."""
    if job.status is not JobStatus.SUCCEEDED or not 0 <= n < job.images:
        raise not_found("image")
    data = store.get_blob(Keys.image(job.id, n))
    if data is None:
        raise not_found("image")
    return Response(data, media_type="image/png",
                    headers={"Cache-Control": "private, max-age=3600"})


@router.get("/{job_id}/preview.png", response_class=Response, responses=_PNG)
def get_preview(job: JobDep, store: StoreDep) -> Response:
    """All images of the job side by side: rows sampled so far, the rest grey."""
    data = store.get_blob(Keys.preview(job.id)) if job.has_preview else None
    if data is None:
        raise not_found("preview")
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})
