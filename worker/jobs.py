"""The RQ job `worker.jobs.generate(payload)`: one attempt of one generation job.

RQ calls it by dotted path with a plain JSON dict. The loaded model and the store live in
the process's `WorkerContext`, set once by `worker.runtime` before the worker starts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
import torch
from rq.timeouts import JobTimeoutException

from model import GenerationStopped, PromptPix

from . import metrics
from .images import grey_preview, preview_png, result_pngs
from .protocol import (
    PROGRESS_MIN_INTERVAL_S,
    JobErrorCode,
    JobPayload,
    JobStatus,
    JobStore,
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
    current_job: str | None = None
    shutdown_deadline: float | None = None  # monotonic; set by SIGTERM


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
    """Run one attempt of a job; record its outcome in the job hash.

    Failures are recorded (`timeout`, `out_of_memory`, `model_error`) and then re-raised so
    RQ records them too; the worker keeps serving either way.
    """
    ctx = get_context()
    p = parse_payload(payload)
    job_id, attempt, worker = p.job_id, p.attempt, ctx.worker_name
    store = ctx.store
    info = ctx.model_info
    # Announce the job in the heartbeat before claiming: the reaper then never sees a fresh
    # heartbeat without the job it just took.
    ctx.current_job = job_id
    try:
        claimed = store.claim(job_id, rq_job_id(job_id, attempt), worker,
                              {"id": info["id"], "image_size": info["image_size"],
                               "channels": info["channels"]})
        if claimed != "ok":
            logger.info("job %s attempt %d skipped: %s", job_id, attempt, claimed)
            return {"job_id": job_id, "skipped": claimed}
        return _run(ctx, p)
    finally:
        ctx.current_job = None


def _fail(ctx: WorkerContext, p: JobPayload, code: JobErrorCode, message: str) -> None:
    recorded = ctx.store.finish(p.job_id, p.attempt, ctx.worker_name, JobStatus.FAILED,
                                error=(code.value, message))
    metrics.JOBS_COMPLETED.labels(JobStatus.FAILED.value).inc()
    logger.error("job %s attempt %d failed %s: %s%s", p.job_id, p.attempt, code.value, message,
                 "" if recorded else " (no longer ours; not recorded)")


def _run(ctx: WorkerContext, p: JobPayload) -> dict[str, Any]:
    job_id, attempt, params = p.job_id, p.attempt, p.params
    store, info = ctx.store, ctx.model_info
    job = store.get(job_id) or {}
    if job.get("created_at") and job.get("started_at"):
        metrics.QUEUE_WAIT.observe(max(0.0, float(job["started_at"]) - float(job["created_at"])))
    size, channels = info["image_size"], info["channels"]
    store.write_progress(job_id, attempt, ctx.worker_name, 0.0,
                         grey_preview(params.num_images, channels, size))
    run = _Attempt(ctx, p)
    seeds = params.image_seeds()
    logger.info("job %s attempt %d running: %d image(s), seed %d", job_id, attempt,
                params.num_images, params.seed)
    start = time.perf_counter()
    try:
        if params.class_label is not None and params.class_label >= info["num_classes"]:
            raise ValueError(f"class_label {params.class_label} is not a class of model "
                             f"{info['id']} ({info['num_classes']} classes)")
        images = ctx.model.generate(
            [params.prompt], num_images=params.num_images,
            class_labels=None if params.class_label is None else [params.class_label],
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
            guidance_scale=params.guidance_scale, seed=seeds,
            progress=run.progress, should_stop=run.should_stop,
        )
    except GenerationStopped:
        if run.shutdown:
            outcome = store.requeue(job_id, attempt, ctx.worker_name, lost=False)
            logger.warning("job %s attempt %d stopped for shutdown: %s", job_id, attempt, outcome)
            return {"job_id": job_id, "requeued": outcome}
        logger.info("job %s attempt %d stopped: canceled or handed on", job_id, attempt)
        metrics.JOBS_COMPLETED.labels(JobStatus.CANCELED.value).inc()
        return {"job_id": job_id, "stopped": True}
    except JobTimeoutException:
        _fail(ctx, p, JobErrorCode.TIMEOUT,
              f"the job ran longer than PROMPTPIX_JOB_TIMEOUT={ctx.settings.job_timeout} s")
        raise
    except torch.cuda.OutOfMemoryError as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _fail(ctx, p, JobErrorCode.OUT_OF_MEMORY, f"out of GPU memory: {str(e)[:500]}")
        raise
    except SystemExit:
        # A second SIGTERM (cold shutdown): hand the job on rather than leave it running.
        store.requeue(job_id, attempt, ctx.worker_name, lost=False)
        raise
    except Exception as e:
        # Whatever the model raised, the job must not stay `running` behind a live worker.
        _fail(ctx, p, JobErrorCode.MODEL_ERROR, f"{type(e).__name__}: {str(e)[:1000]}")
        raise
    elapsed = time.perf_counter() - start
    params_public = params.model_dump(mode="json")
    params_public.pop("prompt")
    pngs = result_pngs(images, params.prompt, seeds, params_public, info["id"])
    ok = store.finish(job_id, attempt, ctx.worker_name, JobStatus.SUCCEEDED, images=pngs)
    tokens = params.num_images * size * size * channels
    metrics.GENERATION.observe(elapsed)
    metrics.TOKENS.inc(tokens)
    metrics.IMAGES.inc(params.num_images)
    metrics.TOKENS_PER_S.set(tokens / max(elapsed, 1e-9))
    metrics.JOBS_COMPLETED.labels(
        JobStatus.SUCCEEDED.value if ok else JobStatus.CANCELED.value).inc()
    logger.info("job %s attempt %d %s in %.2f s (%s)", job_id, attempt,
                "succeeded" if ok else "finished but was no longer ours", elapsed,
                json.dumps({"tokens_per_s": round(tokens / max(elapsed, 1e-9))}))
    return {"job_id": job_id, "images": len(pngs) if ok else 0}
