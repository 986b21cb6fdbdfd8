"""The RQ job `worker.jobs.generate(payload)`: one attempt of one generation job.

RQ calls it by dotted path with a plain JSON dict. The loaded model and the store live in
the process's `WorkerContext`, set once by `worker.runtime` before the worker starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis
import torch
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from model import PromptPix, SampleRequest, StaticDecoder, generate_batch

from . import metrics
from .images import UploadRefused, grey_preview, prepared_upload, preview_png, result_pngs
from .protocol import (
    PROGRESS_MIN_INTERVAL_S,
    JobErrorCode,
    JobKind,
    JobPayload,
    JobStatus,
    JobStore,
    Keys,
    PayloadError,
    Settings,
    parse_payload,
    payload_kind,
    rq_job_id,
    storage_full,
)

logger = logging.getLogger(__name__)

FINAL_WRITE_RETRY_S = 120.0  # how long finished images wait for a full Redis to take them
FINAL_WRITE_BACKOFF_S = (0.2, 5.0)  # first and longest pause between two tries


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
        self.full_logged = False  # "Redis is full" said once per attempt

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
        except redis.ResponseError as e:
            if not storage_full(e):
                raise
            if not self.full_logged:
                logger.warning("job %s: progress not written (Redis is full)", self.p.job_id)
            self.full_logged = True
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


class InvalidJob(ValueError):
    """A job this worker refused before sampling (`invalid_payload` / `invalid_request`)."""


def generate(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one attempt of a job (with PROMPTPIX_MAX_BATCH > 1, of queued jobs behind it too).

    Outcomes are recorded per job in its hash. A job that does not parse or that this model
    cannot run fails alone (`invalid_payload`, `invalid_request`) before it joins a batch.
    Failures of the batch (`timeout`, `out_of_memory`, `model_error`), wherever they happen
    from the claim to the final write, end every job of the batch not yet recorded and are
    re-raised so RQ records them too; the worker keeps serving either way.
    """
    ctx = get_context()
    try:
        p = parse_payload(payload)
    except PayloadError as e:
        rq_job = get_current_job()
        if rq_job is not None:
            ctx.store.fail_queued(rq_job.id, JobErrorCode.INVALID_PAYLOAD, str(e))
        metrics.JOBS_COMPLETED.labels(JobStatus.FAILED.value).inc()
        raise
    # Announce the job in the heartbeat before claiming: the reaper then never sees a fresh
    # heartbeat without the job it just took.
    ctx.current_jobs = [p.job_id]
    try:
        claimed = ctx.store.claim(p.job_id, rq_job_id(p.job_id, p.attempt), ctx.worker_name,
                                  _model_ref(ctx))
        if claimed != "ok":
            logger.info("job %s attempt %d skipped: %s", p.job_id, p.attempt, claimed)
            return {"job_id": p.job_id, "skipped": claimed}
        prefixes: dict[str, torch.Tensor] = {}  # completions' init images, decoded once
        problem = _unrunnable(ctx, p, prefixes)
        if problem is not None:
            _fail(ctx, p.job_id, p.attempt, JobErrorCode.INVALID_REQUEST, problem)
            raise InvalidJob(problem)
        batch = [p, *_take_mates(ctx, ctx.settings.max_batch - p.params.samples, prefixes)]
        return _run(ctx, batch, prefixes)
    finally:
        ctx.current_jobs = []


def _unrunnable(ctx: WorkerContext, p: JobPayload,
                prefixes: dict[str, torch.Tensor]) -> str | None:
    """Why this model cannot run a job that parses (None: it can); a completion's
    prepared init image goes into `prefixes` under its job id."""
    info = ctx.model_info
    label = p.params.class_label
    if label is not None and label >= info["num_classes"]:
        return (f"class_label {label} is not a class of model {info['id']} "
                f"({info['num_classes']} classes)")
    try:
        prefix = _init_image(ctx, p)
    except UploadRefused as e:
        return str(e)
    if prefix is not None:
        prefixes[p.job_id] = prefix
    return None


def _init_image(ctx: WorkerContext, p: JobPayload) -> torch.Tensor | None:
    """A completion's init image, prepared for the model (None: not a completion)."""
    params, info = p.params, ctx.model_info
    if not params.has_init_image and params.keep_rows is None:
        return None
    rows = info["image_size"]
    if not params.has_init_image or params.keep_rows is None:
        raise UploadRefused("init_image and keep_rows go together")
    if params.keep_rows >= rows:
        raise UploadRefused(f"keep_rows must be 1..{rows - 1} for model {info['id']} "
                            f"({rows} rows), got {params.keep_rows}")
    return prepared_upload(ctx.store, p.job_id, rows, info["channels"])[0]


def _model_ref(ctx: WorkerContext) -> dict[str, Any]:
    info = ctx.model_info
    return {"id": info["id"], "image_size": info["image_size"], "channels": info["channels"]}


def _take_mates(ctx: WorkerContext, budget: int,
                prefixes: dict[str, torch.Tensor]) -> list[JobPayload]:
    """Claim queued jobs, in queue order, while their images fit in `budget`.

    Stops at the first job that does not fit, so no job is overtaken by a later one. A job
    that does not parse or that this model cannot run is taken and failed on its own: it
    never joins the batch, and never blocks the jobs behind it."""
    mates: list[JobPayload] = []
    seen: set[str] = set()
    while budget >= 1:
        try:
            # Entries failed just now are gone from the queue: look again past them.
            head = [h for h in ctx.store.queued_head(budget + len(seen)) if h[0] not in seen]
        except (redis.ConnectionError, redis.TimeoutError) as e:
            logger.warning("not batching: Redis %s", e)
            return mates
        if not head:
            return mates
        for job_id, attempt, raw in head:
            if payload_kind(raw) is not JobKind.GENERATE:
                return mates  # a sampling batch holds one kind; queue order is kept
            seen.add(job_id)
            problem: tuple[JobErrorCode, str] | None = None
            try:
                m = parse_payload(raw)
            except PayloadError as e:
                problem = (JobErrorCode.INVALID_PAYLOAD, str(e))
            else:
                if m.params.samples > budget:
                    return mates
                why = _unrunnable(ctx, m, prefixes)
                problem = None if why is None else (JobErrorCode.INVALID_REQUEST, why)
            ctx.current_jobs = [*ctx.current_jobs, job_id]  # announce before claiming
            outcome = ctx.store.take(job_id, rq_job_id(job_id, attempt), ctx.worker_name,
                                     _model_ref(ctx))
            if outcome != "ok" or problem is not None:
                ctx.current_jobs = [j for j in ctx.current_jobs if j != job_id]
                if outcome == "ok" and problem is not None:
                    _fail(ctx, job_id, attempt, *problem)
                continue
            mates.append(m)
            budget -= m.params.samples
            if budget < 1:
                return mates
    return mates


def _fail(ctx: WorkerContext, job_id: str, attempt: int, code: JobErrorCode,
          message: str) -> None:
    recorded = _finish(ctx, job_id, attempt, JobStatus.FAILED, error=(code.value, message))
    if recorded:
        metrics.JOBS_COMPLETED.labels(JobStatus.FAILED.value).inc()
    else:
        _count_lost(ctx, job_id)
    logger.error("job %s attempt %d failed %s: %s%s", job_id, attempt, code.value, message,
                 "" if recorded else " (no longer ours; not recorded)")


def _finish(ctx: WorkerContext, job_id: str, attempt: int, status: JobStatus,
            images: list[bytes] | None = None, error: tuple[str, str] | None = None,
            result: Any = None) -> bool:
    """The final write of one job; retried while Redis is full (or unreachable) for up to
    FINAL_WRITE_RETRY_S, so finished images wait for room instead of being dropped.

    Returns whether the job was still this attempt's. Raises the last Redis error when the
    retries run out (the job is then still `running`, and the reaper hands it on)."""
    deadline = time.monotonic() + FINAL_WRITE_RETRY_S
    pause, longest = FINAL_WRITE_BACKOFF_S
    tries = 0
    while True:
        try:
            ok = ctx.store.finish(job_id, attempt, ctx.worker_name, status,
                                  images=images or (), error=error, result=result)
            if tries:
                logger.warning("job %s: final write went through after %d retries", job_id,
                               tries)
            return ok
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as e:
            full = isinstance(e, redis.ResponseError) and storage_full(e)
            if isinstance(e, redis.ResponseError) and not full:
                raise
            if time.monotonic() + pause > deadline:
                metrics.FINAL_WRITES_DROPPED.inc()
                logger.error("job %s: final write (%s) refused for %.0f s; giving up (%s)",
                             job_id, status.value, FINAL_WRITE_RETRY_S, e)
                raise
            tries += 1
            metrics.FINAL_WRITE_RETRIES.labels("full" if full else "unreachable").inc()
            if tries == 1:
                logger.warning("job %s: final write (%s, %d image(s)) refused: %s; keeping "
                               "the results and retrying for up to %.0f s", job_id,
                               status.value, len(images or ()), "Redis is full" if full else e,
                               FINAL_WRITE_RETRY_S)
            time.sleep(pause)
            pause = min(longest, pause * 2)


def _count_lost(ctx: WorkerContext, job_id: str) -> None:
    """Count an attempt whose job was no longer its own at the end as what it became:
    `canceled` when the job was canceled, else handed to another attempt (not an ending)."""
    try:
        job = ctx.store.get(job_id)
    except redis.RedisError:
        job = None
    if job is not None and job.status is JobStatus.CANCELED:
        metrics.JOBS_COMPLETED.labels(JobStatus.CANCELED.value).inc()
    else:
        metrics.ATTEMPTS_HANDED_ON.inc()


def _start(ctx: WorkerContext, p: JobPayload, prefix: torch.Tensor | None) -> None:
    """Queue-wait metric and the first preview of a claimed job: all grey, or a
    completion's kept rows of its init image over grey."""
    info, params = ctx.model_info, p.params
    first = (grey_preview(params.samples, info["channels"], info["image_size"])
             if prefix is None else
             preview_png(prefix.expand(params.samples, *prefix.shape), params.keep_rows or 0))
    job = ctx.store.get(p.job_id)
    if job is not None and job.started_at is not None:
        metrics.QUEUE_WAIT.observe(max(0.0, job.started_at - job.created_at))
    try:
        ctx.store.write_progress(p.job_id, p.attempt, ctx.worker_name, 0.0, first)
    except redis.ResponseError as e:
        if not storage_full(e):
            raise
        logger.warning("job %s: first preview not written (Redis is full)", p.job_id)
    logger.info("job %s attempt %d running: %d image(s), seed %d", p.job_id, p.attempt,
                params.num_images, params.seed)


def _request(p: JobPayload, run: _Attempt, prefix: torch.Tensor | None) -> SampleRequest:
    params = p.params
    return SampleRequest(
        [params.prompt], num_images=params.samples,
        class_labels=None if params.class_label is None else [params.class_label],
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        guidance_scale=params.guidance_scale, seed=params.sample_seeds(),
        progress=run.progress, should_stop=run.should_stop,
        negative_prompt=params.negative_prompt, prefix=prefix,
        keep_rows=params.keep_rows or 0)


def _run(ctx: WorkerContext, batch: list[JobPayload],
         prefixes: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Sample every claimed job of `batch` in one sampling batch; record each outcome.

    One handler covers the whole lifecycle, from the first preview to the last final write
    (PNG encoding included): a job not yet recorded when something goes wrong ends with that
    error, never left `running` for the reaper to retry as `worker_lost`."""
    info, primary = ctx.model_info, batch[0]
    pending = {p.job_id: p for p in batch}  # claimed, outcome not recorded yet
    try:
        for p in batch:
            _start(ctx, p, prefixes.get(p.job_id))
        if len(batch) > 1:
            logger.info("batch of %d jobs (%d images): %s", len(batch),
                        sum(p.params.samples for p in batch),
                        " ".join(p.job_id for p in batch))
        metrics.BATCH_JOBS.observe(len(batch))
        runs = [_Attempt(ctx, p) for p in batch]
        start = time.perf_counter()
        requests = [_request(p, r, prefixes.get(p.job_id))
                    for p, r in zip(batch, runs, strict=True)]
        results = generate_batch(ctx.model, requests, decoder=ctx.decoder)
        elapsed = time.perf_counter() - start
        records: dict[str, dict[str, Any]] = {}
        # Jobs stopped for shutdown are each requeued at the front of the queue: they go
        # last, the batch's last one first, so that they keep their queue order.
        order = ([i for i, run in enumerate(runs) if not run.shutdown]
                 + [i for i, run in reversed(list(enumerate(runs))) if run.shutdown])
        for i in order:
            p = batch[i]
            records[p.job_id] = _record(ctx, p, runs[i], results[i], results.bits[i], elapsed)
            del pending[p.job_id]
    except JobTimeoutException:
        for p in pending.values():
            _fail(ctx, p.job_id, p.attempt, JobErrorCode.TIMEOUT,
                  f"the job ran longer than PROMPTPIX_JOB_TIMEOUT={ctx.settings.job_timeout} s")
        raise
    except torch.cuda.OutOfMemoryError as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for p in pending.values():
            _fail(ctx, p.job_id, p.attempt, JobErrorCode.OUT_OF_MEMORY,
                  f"out of GPU memory: {str(e)[:500]}")
        raise
    except SystemExit:
        # A second SIGTERM (cold shutdown): hand the jobs on rather than leave them running
        # (each at the front of the queue: the last first, so they keep their order).
        for p in reversed(pending.values()):
            ctx.store.requeue(p.job_id, p.attempt, ctx.worker_name, lost=False)
        raise
    except (redis.ConnectionError, redis.TimeoutError):
        raise  # recording needs Redis: the reaper hands these jobs on when it is back
    except Exception as e:
        if storage_full(e):
            raise  # a final write refused for its whole retry window: as Redis going away
        # Whatever the model raised, no job may stay `running` behind a live worker.
        for p in pending.values():
            _fail(ctx, p.job_id, p.attempt, JobErrorCode.MODEL_ERROR,
                  f"{type(e).__name__}: {str(e)[:1000]}")
        raise
    size, channels = info["image_size"], info["channels"]
    total_tokens = sum(p.params.samples for p in batch) * size * size * channels
    # RQ's return value: the primary job's outcome as before, plus the batch's others.
    out: dict[str, Any] = {"job_id": primary.job_id, **records.get(primary.job_id, {})}
    if len(batch) > 1:
        out["batch"] = records
    metrics.TOKENS_PER_S.set(total_tokens / max(elapsed, 1e-9))
    return out


def best_images(images: torch.Tensor, bits: torch.Tensor, seeds: list[int], keep: int
                ) -> tuple[torch.Tensor, list[float], list[int]]:
    """The `keep` most probable samples (fewest bits/dim first; ties in sampling order),
    with their bits/dim and seeds; all of them in sampling order when `keep` is all."""
    order = list(range(len(seeds)))
    if keep < len(seeds):
        order = sorted(order, key=lambda k: (float(bits[k]), k))[:keep]
    return images[order], [float(bits[k]) for k in order], [seeds[k] for k in order]


def _record(ctx: WorkerContext, p: JobPayload, run: _Attempt, images: torch.Tensor | None,
            bits: torch.Tensor | None, elapsed: float) -> dict[str, Any]:
    """Finish one job of a batch: PNGs (with each image's exact bits/dim, the `best_of`
    most probable), or requeue/cancel when its sampling was stopped."""
    job_id, attempt, params, store = p.job_id, p.attempt, p.params, ctx.store
    if images is None:
        if run.shutdown:
            outcome = store.requeue(job_id, attempt, ctx.worker_name, lost=False)
            logger.warning("job %s attempt %d stopped for shutdown: %s", job_id, attempt, outcome)
            return {"requeued": outcome}
        logger.info("job %s attempt %d stopped: canceled or handed on", job_id, attempt)
        _count_lost(ctx, job_id)
        return {"stopped": True}
    if run.hooks.get("encode_delay"):  # test hook: a slow PNG encoding (issue 14, item 13)
        time.sleep(float(run.hooks["encode_delay"]))
    params_public = params.model_dump(mode="json")
    params_public.pop("prompt")
    assert bits is not None  # generate_batch gives bits for every request it finished
    images, image_bits, seeds = best_images(images, bits, params.sample_seeds(),
                                            params.num_images)
    pngs = result_pngs(images, params.prompt, seeds, params_public, ctx.model_info["id"],
                       bits=image_bits)
    ok = _finish(ctx, job_id, attempt, JobStatus.SUCCEEDED, images=pngs,
                 result={"image_bits_per_dim": image_bits, "seeds": seeds})
    info = ctx.model_info
    tokens = params.samples * info["image_size"] ** 2 * info["channels"]
    metrics.GENERATION.observe(elapsed)
    metrics.TOKENS.inc(tokens)
    metrics.IMAGES.inc(params.samples)
    if ok:
        metrics.JOBS_COMPLETED.labels(JobStatus.SUCCEEDED.value).inc()
        if params.has_init_image:  # else it expires with the job
            with contextlib.suppress(redis.RedisError):
                store.r.delete(Keys.upload(job_id))
    else:
        _count_lost(ctx, job_id)
    logger.info("job %s attempt %d %s in %.2f s (%s)", job_id, attempt,
                "succeeded" if ok else "finished but was no longer ours", elapsed,
                json.dumps({"tokens_per_s": round(tokens / max(elapsed, 1e-9))}))
    return {"images": len(pngs) if ok else 0}


# The allowlisted score function (API.md "Job kinds"), implemented in worker/scoring.py.
from .scoring import score  # noqa: E402

__all__ = ["generate", "score"]
