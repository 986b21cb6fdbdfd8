"""`/v1/scores`: the exact likelihood of an image under captions (score jobs).

Score jobs share the generations' queue, store, ownership, cancel, limits and TTL; a job
id read under the other kind's route is 404. The API checks the upload's size (the body
limit, `PROMPTPIX_MAX_UPLOAD_BYTES`) and format only; the worker decodes and prepares it.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from worker.protocol import (
    JobKind,
    JobRecord,
    JobStatus,
    Keys,
    ScoreParams,
)

from ..deps import (
    AsyncStoreDep,
    JobIdPath,
    PrincipalDep,
    SettingsDep,
    StoreDep,
    find_job,
    rate_limited,
)
from ..errors import ERROR_RESPONSES, ApiError, ErrorResponse, not_found
from ..imaging import decode_upload
from ..modelsel import resolve_model_async
from ..schemas import JobErrorOut, JobModel
from . import generations
from .generations import (
    _WAIT_DOC,
    admit,
    answer_after_wait,
    cancel,
    idempotency,
    iso,
)

logger = logging.getLogger(__name__)

PREFIX = "/v1/scores"
# Routes whose body limit is PROMPTPIX_MAX_UPLOAD_BYTES: scores, and generations (init_image).
UPLOAD_PATHS = frozenset({PREFIX}) | generations.UPLOAD_PATHS

router = APIRouter(prefix=PREFIX, tags=["scores"], responses=ERROR_RESPONSES,
                   dependencies=[Depends(rate_limited)])


class ScoreRequest(ScoreParams):
    """`POST /v1/scores`: an image (base64 PNG, JPEG or WebP; a `data:` URL prefix is
    allowed) and 1..32 captions to score it against."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "image": "iVBORw0KGgo...", "captions": ["a red circle", "a blue circle"],
        "tolerance": 0.01}]})

    image: str | None = Field(None, min_length=1, description="base64 PNG, JPEG or WebP")
    job_id: str | None = Field(None, description="instead of `image`: a finished generation "
                                                 "of the caller's, with `image_index`")
    image_index: int | None = Field(None, ge=0, description="which image of `job_id` (from 0)")


class ScoreCreated(BaseModel):
    """Answer to a score submission (202, or 200 for a repeated Idempotency-Key)."""

    id: str
    status: str
    created_at: str
    status_url: str


class ScoreResult(BaseModel):
    """One caption's score."""

    caption: str
    bits_per_dim: float = Field(description="exact conditional bits/dim, no guidance")
    probability: float = Field(description="posterior over the given captions (uniform prior)")
    bits_per_dim_tolerant: float | None = Field(
        None, description="bits/dim under the outlier model (when tolerance > 0); it ranks")


class ScoreView(BaseModel):
    """`GET /v1/scores/{id}`."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    status: str
    attempt: int
    progress: float
    queue_position: int | None
    captions: list[str]
    params: dict[str, object]
    model: JobModel | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    results: list[ScoreResult] | None = None
    ranking: list[int] | None = None
    unconditional_bits_per_dim: float | None = None
    resized: bool | None = None
    surprise_url: str | None = None
    error: JobErrorOut | None


def score_view(job: JobRecord, store: StoreDep) -> ScoreView:
    """The public view of a stored score job (the upload is never echoed)."""
    state = job.status
    params = dict(job.params)
    captions = params.pop("captions")
    position = store.queue_position(job) if state is JobStatus.QUEUED else None
    if state is JobStatus.QUEUED and position is None:
        position = 0
    done = state is JobStatus.SUCCEEDED and isinstance(job.result, dict)
    result: dict[str, Any] = job.result if done else {}
    error = (JobErrorOut(code=job.error_code, message=job.error_message)
             if job.error_code else None)
    return ScoreView(
        id=job.id, status=state.value, attempt=job.attempt, progress=job.progress,
        queue_position=position, captions=captions, params=params,
        model=JobModel(**job.model) if job.model else None,
        created_at=iso(job.created_at) or "", started_at=iso(job.started_at),
        finished_at=iso(job.finished_at),
        results=[ScoreResult(**r) for r in result["results"]] if done else None,
        ranking=result.get("ranking"),
        unconditional_bits_per_dim=result.get("unconditional_bits_per_dim"),
        resized=result.get("resized"),
        surprise_url=f"{PREFIX}/{job.id}/surprise.png" if done and job.images else None,
        error=error,
    )


def source_image(body: ScoreRequest, principal: PrincipalDep, store: StoreDep
                 ) -> tuple[bytes, str | None]:
    """The image to score and the model that made it: the upload (None), or a finished
    generation's image (same ownership rules as reading it: another key's job is 404)."""
    if (body.image is None) == (body.job_id is None):
        raise ApiError(422, "invalid_request",
                       "give either image (base64) or job_id with image_index", "image")
    if body.image is not None:
        if body.image_index is not None:
            raise ApiError(422, "invalid_request", "image_index goes with job_id",
                           "image_index")
        return decode_upload(body.image), None
    if body.image_index is None:
        raise ApiError(422, "invalid_request", "job_id needs image_index", "image_index")
    source = find_job(body.job_id or "", principal, store, JobKind.GENERATE)
    data = (store.get_blob(Keys.image(source.id, body.image_index))
            if source.status is JobStatus.SUCCEEDED and body.image_index < source.images
            else None)
    if data is None:
        raise ApiError(404, "not_found", f"generation {source.id} has no finished image "
                       f"{body.image_index} ({source.images} images, {source.status.value})",
                       "image_index")
    made_by = source.model.get("id") if source.model else source.params.get("model")
    return data, made_by


async def _check(body: ScoreRequest, settings: SettingsDep, astore: AsyncStoreDep,
                 default: str | None = None) -> str:
    """Check the request against the settings and its model's facts; return the model id
    (resolved as for generations: named, else `default` (the model that made a generated
    image), else PROMPTPIX_DEFAULT_MODEL or the only one)."""
    for n, caption in enumerate(body.captions):
        if len(caption) > settings.max_prompt_chars:
            raise ApiError(422, "invalid_request", f"caption {n} is longer than "
                           f"{settings.max_prompt_chars} characters", f"captions.{n}")
    model = await resolve_model_async(astore, body.model or default)
    if body.class_labels and "num_classes" in model:
        classes = int(model.get("num_classes") or 0)
        bad = [x for x in body.class_labels if x >= classes]
        if bad:
            raise ApiError(422, "invalid_request", f"class label {bad[0]} is not a class of "
                           f"model {model['id']!r} ({classes} classes)", "class_labels")
    return str(model["id"])


async def _submit(body: ScoreRequest, response: Response, principal: PrincipalDep,
                  store: StoreDep, astore: AsyncStoreDep, settings: SettingsDep,
                  idempotency_key: str | None) -> ScoreCreated:
    upload, made_by = await run_in_threadpool(source_image, body, principal, store)
    model = await _check(body, settings, astore, made_by)
    # Scoped by key and kind: the same key may name a generation and a score.
    idem = idempotency(idempotency_key, body.model_dump(),
                       f"{principal.owner or 'global'}:{JobKind.SCORE.value}")
    params = ScoreParams(captions=body.captions, class_labels=body.class_labels,
                         tolerance=body.tolerance, model=model)
    job, created = await admit(astore, params, principal, idem, upload=upload)
    if not created:
        response.status_code = status.HTTP_200_OK
    url = f"{PREFIX}/{job.id}"
    response.headers["Location"] = url
    return ScoreCreated(id=job.id, status=job.status.value,
                        created_at=iso(job.created_at) or "", status_url=url)


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=ScoreCreated,
             responses={200: {"model": ScoreView | ScoreCreated,
                              "description": "Repeated Idempotency-Key (ScoreCreated), or "
                              "the finished job under " + _WAIT_DOC},
                        404: {"model": ErrorResponse, "description": "`model_not_found`"},
                        409: {"model": ErrorResponse, "description": "`idempotency_conflict`"},
                        413: {"model": ErrorResponse, "description": "body over "
                              "PROMPTPIX_MAX_UPLOAD_BYTES (`payload_too_large`)"},
                        503: {"model": ErrorResponse, "description": "Redis unreachable "
                              "(`unavailable`) or full (`storage_full`); see Retry-After"}})
async def submit_score(
    body: ScoreRequest, request: Request, response: Response, principal: PrincipalDep,
    store: StoreDep, astore: AsyncStoreDep, settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    prefer: Annotated[str | None, Header(description=_WAIT_DOC)] = None,
) -> Response:
    """Queue a score job: the image's exact bits/dim under each caption."""
    created = await _submit(body, response, principal, store, astore, settings,
                            idempotency_key)
    return await answer_after_wait(  # type: ignore[arg-type]
        request, created, response,
        lambda: run_in_threadpool(
            lambda: score_view(find_job(created.id, principal, store, JobKind.SCORE), store)))


def load_score(job_id: JobIdPath, principal: PrincipalDep, store: StoreDep) -> JobRecord:
    """Dependency: the caller's score job (404 for a generation's id)."""
    return find_job(job_id, principal, store, JobKind.SCORE)


ScoreDep = Annotated[JobRecord, Depends(load_score)]


@router.get("/{job_id}", response_model=ScoreView)
def get_score(job: ScoreDep, store: StoreDep) -> ScoreView:
    """Status and, when succeeded, each caption's bits/dim and probability."""
    return score_view(job, store)


@router.delete("/{job_id}", response_model=ScoreView,
               responses={409: {"model": ErrorResponse, "description": "`not_cancelable`"}})
def cancel_score(job: ScoreDep, store: StoreDep) -> ScoreView:
    """Cancel a queued or running score job."""
    return score_view(cancel(job, store), store)


@router.get("/{job_id}/surprise.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "PNG heatmap"}})
def get_surprise(job: ScoreDep, store: StoreDep) -> Response:
    """Heatmap of each pixel's -log2 p (bits, summed over channels) under the most probable
    caption, enlarged, with its colour scale."""
    if job.status is not JobStatus.SUCCEEDED or job.images < 1:
        raise not_found("surprise map")
    data = store.get_blob(Keys.image(job.id, 0))
    if data is None:
        raise not_found("surprise map")
    return Response(data, media_type="image/png",
                    headers={"Cache-Control": "private, max-age=3600"})
