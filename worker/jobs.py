"""The RQ job `worker.jobs.generate(payload)`: one attempt of one generation job.

RQ calls it by dotted path with a plain JSON dict. The loaded model and the store live in
the process's `WorkerContext`, set once by `worker.runtime` before the worker starts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis
import torch
from rq.timeouts import JobTimeoutException

from model import PromptPix, SampleRequest, StaticDecoder, generate_batch

from . import metrics
from .images import grey_preview, preview_png, result_pngs
from .protocol import (
    PROGRESS_MIN_INTERVAL_S,
    JobErrorCode,
    JobPayload,
    JobStatus,
    JobStore,
    PayloadError,
    Settings,
    parse_payload,
    rq_job_id,
)

logger = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What every job in this process shares: model, store, identity, shutdown state."""

    store: JobStore
    settings: Settings
    model: PromptPix
    model_info: dict[str, Any]
    worker_name: str
    # Jobs being sampled now (one, or a batch). Replaced, never mutated, so the heartbeat
    # thread always reads a consistent list.
    current_jobs: list[str] = field(default_factory=list)
    shutdown_deadline: float | None = None  # monotonic; set by SIGTERM
    decoder: StaticDecoder | None = None  # compiled decode (PROMPTPIX_COMPILE on CUDA)


_context: WorkerContext | None = None


def set_context(ctx: WorkerContext | None) -> None:
    """Install the process's context (called by `worker.runtime`)."""
    global _context
    _context = ctx


def get_context() -> WorkerContext:
    """The process's context; a job run outside a promptpix worker fails clearly."""
    if _context is None:
        raise RuntimeError("worker.jobs.generate runs only inside `promptpix worker`")
    return _context


class _Attempt:
    """Callbacks of one sampling run: progress/preview writes and the stop check."""

    def __init__(self, ctx: WorkerContext, p: JobPayload) -> None:
        self.ctx, self.p = ctx, p
        self.hooks = (p.test_hooks or {}) if ctx.settings.test_hooks else {}
        self.last_write = 0.0
        self.lost = False  # the store refused our write: canceled or handed on
        self.shutdown = False  # stopped because SIGTERM's grace ran out

    def progress(self, rows_done: int, rows_total: int, partial: torch.Tensor) -> None:
        if self.hooks.get("row_delay"):
            time.sleep(float(self.hooks["row_delay"]))
        if self.hooks.get("oom") and rows_done >= 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (forced by a test hook)")
        now = time.monotonic()
        if rows_done < rows_total and now - self.last_write < PROGRESS_MIN_INTERVAL_S:
            return
        self.last_write = now
        try:
            ok = self.ctx.store.write_progress(self.p.job_id, self.p.attempt,
                                               self.ctx.worker_name, rows_done / rows_total,
                                               preview_png(partial, rows_done))
        except (redis.ConnectionError, redis.TimeoutError) as e:
            logger.warning("job %s: progress not written (Redis: %s)", self.p.job_id, e)
            return
        self.lost = self.lost or not ok

    def should_stop(self) -> bool:
        if self.lost:
            return True
        deadline = self.ctx.shutdown_deadline
        if deadline is not None and time.monotonic() >= deadline:
            self.shutdown = True
            return True
        try:
            return self.ctx.store.should_stop(self.p.job_id, self.p.attempt, self.ctx.worker_name)
        except (redis.ConnectionError, redis.TimeoutError):
            return False  # keep sampling; the heartbeat decides whether we are lost


def generate(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one attempt of a job (with PROMPTPIX_MAX_BATCH > 1, of queued jobs behind it too).

    Outcomes are recorded per job in its hash. Failures (`timeout`, `out_of_memory`,
    `model_error`) end every job of the batch and are re-raised so RQ records them too;
    the worker keeps serving either way.
    """
    ctx = get_context()
    p = parse_payload(payload)
    # Announce the job in the heartbeat before claiming: the reaper then never sees a fresh
    # heartbeat without the job it just took.
    ctx.current_jobs = [p.job_id]
    try:
        claimed = ctx.store.claim(p.job_id, rq_job_id(p.job_id, p.attempt), ctx.worker_name,
                                  _model_ref(ctx))
        if claimed != "ok":
            logger.info("job %s attempt %d skipped: %s", p.job_id, p.attempt, claimed)
            return {"job_id": p.job_id, "skipped": claimed}
        batch = [p, *_take_mates(ctx, ctx.settings.max_batch - p.params.num_images)]
        return _run(ctx, batch)
    finally:
        ctx.current_jobs = []


def _model_ref(ctx: WorkerContext) -> dict[str, Any]:
    info = ctx.model_info
    return {"id": info["id"], "image_size": info["image_size"], "channels": info["channels"]}


def _take_mates(ctx: WorkerContext, budget: int) -> list[JobPayload]:
    """Claim queued jobs, in queue order, while their images fit in `budget`.

    Stops at the first job that does not fit, so no job is overtaken by a later one."""
    mates: list[JobPayload] = []
    if budget < 1:
        return mates
    try:
        head = ctx.store.queued_head(budget)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        logger.warning("not batching: Redis %s", e)
        return mates
    for raw in head:
        try:
            m = parse_payload(raw)
        except PayloadError as e:
            logger.warning("not batching a queued job with a bad payload: %s", e)
            break  # RQ delivers it alone later, and the usual path records the failure
        if m.params.num_images > budget:
            break
        ctx.current_jobs = [*ctx.current_jobs, m.job_id]  # announce before claiming
        outcome = ctx.store.take(m.job_id, rq_job_id(m.job_id, m.attempt), ctx.worker_name,
                                 _model_ref(ctx))
        if outcome != "ok":
            ctx.current_jobs = [j for j in ctx.current_jobs if j != m.job_id]
            continue
        mates.append(m)
        budget -= m.params.num_images
    return mates


def _fail(ctx: WorkerContext, p: JobPayload, code: JobErrorCode, message: str) -> None:
    recorded = ctx.store.finish(p.job_id, p.attempt, ctx.worker_name, JobStatus.FAILED,
                                error=(code.value, message))
    metrics.JOBS_COMPLETED.labels(JobStatus.FAILED.value).inc()
    logger.error("job %s attempt %d failed %s: %s%s", p.job_id, p.attempt, code.value, message,
                 "" if recorded else " (no longer ours; not recorded)")


def _start(ctx: WorkerContext, p: JobPayload) -> None:
    """Queue-wait metric and the all-grey first preview of a claimed job."""
    info, params = ctx.model_info, p.params
    job = ctx.store.get(p.job_id) or {}
    if job.get("created_at") and job.get("started_at"):
        metrics.QUEUE_WAIT.observe(max(0.0, float(job["started_at"]) - float(job["created_at"])))
    ctx.store.write_progress(p.job_id, p.attempt, ctx.worker_name, 0.0,
                             grey_preview(params.num_images, info["channels"],
                                          info["image_size"]))
    logger.info("job %s attempt %d running: %d image(s), seed %d", p.job_id, p.attempt,
                params.num_images, params.seed)


def _request(p: JobPayload, run: _Attempt) -> SampleRequest:
    params = p.params
    return SampleRequest(
        [params.prompt], num_images=params.num_images,
        class_labels=None if params.class_label is None else [params.class_label],
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        guidance_scale=params.guidance_scale, seed=params.image_seeds(),
        progress=run.progress, should_stop=run.should_stop)


def _run(ctx: WorkerContext, batch: list[JobPayload]) -> dict[str, Any]:
    """Sample every claimed job of `batch` in one sampling batch; record each outcome."""
    info, primary = ctx.model_info, batch[0]
    runnable: list[JobPayload] = []
    bad_primary: ValueError | None = None
    for p in batch:
        _start(ctx, p)
        label = p.params.class_label
        if label is not None and label >= info["num_classes"]:
            err = ValueError(f"class_label {label} is not a class of model {info['id']} "
                             f"({info['num_classes']} classes)")
            _fail(ctx, p, JobErrorCode.MODEL_ERROR, f"ValueError: {err}")
            bad_primary = err if p is primary else bad_primary
        else:
            runnable.append(p)
    if not runnable and bad_primary is not None:
        raise bad_primary
    if len(runnable) > 1:
        logger.info("batch of %d jobs (%d images): %s", len(runnable),
                    sum(p.params.num_images for p in runnable),
                    " ".join(p.job_id for p in runnable))
    metrics.BATCH_JOBS.observe(len(runnable))
    runs = [_Attempt(ctx, p) for p in runnable]
    start = time.perf_counter()
    try:
        requests = [_request(p, r) for p, r in zip(runnable, runs, strict=True)]
        results = generate_batch(ctx.model, requests, decoder=ctx.decoder)
    except JobTimeoutException:
        for p in runnable:
            _fail(ctx, p, JobErrorCode.TIMEOUT,
                  f"the job ran longer than PROMPTPIX_JOB_TIMEOUT={ctx.settings.job_timeout} s")
        raise
    except torch.cuda.OutOfMemoryError as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for p in runnable:
            _fail(ctx, p, JobErrorCode.OUT_OF_MEMORY, f"out of GPU memory: {str(e)[:500]}")
        raise
    except SystemExit:
        # A second SIGTERM (cold shutdown): hand the jobs on rather than leave them running.
        for p in runnable:
            ctx.store.requeue(p.job_id, p.attempt, ctx.worker_name, lost=False)
        raise
    except Exception as e:
        # Whatever the model raised, no job may stay `running` behind a live worker.
        for p in runnable:
            _fail(ctx, p, JobErrorCode.MODEL_ERROR, f"{type(e).__name__}: {str(e)[:1000]}")
        raise
    elapsed = time.perf_counter() - start
    size, channels = info["image_size"], info["channels"]
    total_tokens = sum(p.params.num_images for p in runnable) * size * size * channels
    records = {p.job_id: _record(ctx, p, run, images, elapsed)
               for p, run, images in zip(runnable, runs, results, strict=True)}
    # RQ's return value: the primary job's outcome as before, plus the batch's others.
    out: dict[str, Any] = {"job_id": primary.job_id, **records.get(primary.job_id, {})}
    if len(runnable) > 1:
        out["batch"] = records
    metrics.TOKENS_PER_S.set(total_tokens / max(elapsed, 1e-9))
    if bad_primary is not None:
        raise bad_primary
    return out


def _record(ctx: WorkerContext, p: JobPayload, run: _Attempt, images: torch.Tensor | None,
            elapsed: float) -> dict[str, Any]:
    """Finish one job of a batch: PNGs, or requeue/cancel when its sampling was stopped."""
    job_id, attempt, params, store = p.job_id, p.attempt, p.params, ctx.store
    if images is None:
        if run.shutdown:
            outcome = store.requeue(job_id, attempt, ctx.worker_name, lost=False)
            logger.warning("job %s attempt %d stopped for shutdown: %s", job_id, attempt, outcome)
            return {"requeued": outcome}
        logger.info("job %s attempt %d stopped: canceled or handed on", job_id, attempt)
        metrics.JOBS_COMPLETED.labels(JobStatus.CANCELED.value).inc()
        return {"stopped": True}
    params_public = params.model_dump(mode="json")
    params_public.pop("prompt")
    seeds = params.image_seeds()
    pngs = result_pngs(images, params.prompt, seeds, params_public, ctx.model_info["id"])
    ok = store.finish(job_id, attempt, ctx.worker_name, JobStatus.SUCCEEDED, images=pngs)
    info = ctx.model_info
    tokens = params.num_images * info["image_size"] ** 2 * info["channels"]
    metrics.GENERATION.observe(elapsed)
    metrics.TOKENS.inc(tokens)
    metrics.IMAGES.inc(params.num_images)
    metrics.JOBS_COMPLETED.labels(
        JobStatus.SUCCEEDED.value if ok else JobStatus.CANCELED.value).inc()
    logger.info("job %s attempt %d %s in %.2f s (%s)", job_id, attempt,
                "succeeded" if ok else "finished but was no longer ours", elapsed,
                json.dumps({"tokens_per_s": round(tokens / max(elapsed, 1e-9))}))
    return {"images": len(pngs) if ok else 0}
