"""Job transitions: each one atomic (a Lua script, or WATCH/MULTI with the RQ enqueue).

Every write a worker makes is fenced by (status == running, worker == me, attempt ==
mine), so a worker the reaper gave up on can never overwrite the job's next attempt.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from enum import Enum
from typing import Any

import redis
from rq.job import Job

from .base import StoreBase, _s
from .record import JobRecord
from .schema import JobErrorCode, JobStatus, Keys, WebhookEvent, rq_job_id
from .scripts import WEBHOOK_STREAM_MAXLEN

logger = logging.getLogger(__name__)


class Requeue(str, Enum):
    """What `requeue` did with a running attempt."""

    REQUEUED = "requeued"  # back at the front of the queue as attempt + 1
    FAILED = "failed"  # `worker_lost`: its retries were used
    SKIP = "skip"  # the job is no longer that attempt's


class TransitionOps(StoreBase):
    """queued → running → succeeded / failed / canceled, and back to queued."""

    def cancel(self, job_id: str) -> str:
        """Cancel a queued or running job; return 'ok', 'missing' or its finished state."""
        job = self.get(job_id)
        if job is None:
            return "missing"
        # The model (so the queue) of a job never changes: reading it first is safe.
        out = self._cancel(keys=[Keys.job(job_id), self.job_queue(job).key, Keys.running,
                                 Keys.preview(job_id), Keys.queued],
                           args=[repr(time.time()), job_id, self.settings.result_ttl])
        result = _s(out) or "missing"
        if result == "ok":
            logger.info("job %s canceled", job_id)
        return result

    def claim(self, job_id: str, rq_id: str, worker: str, model: dict[str, Any]) -> str:
        """queued -> running for this RQ attempt; 'ok', or why the entry must be skipped."""
        out = self._claim(keys=[Keys.job(job_id), Keys.running, Keys.queued],
                          args=[rq_id, worker, repr(time.time()), json.dumps(model), job_id])
        return _s(out) or "missing"

    def fail_queued(self, rq_id: str, code: JobErrorCode, message: str) -> str | None:
        """queued -> failed for the job that RQ entry `rq_id` stands for, if that entry is
        its current attempt; 'ok', why not, or None when the id names no job of ours."""
        job_id, sep, att = rq_id.rpartition("-a")
        if not sep or not att.isdigit() or len(job_id) != 32:
            return None
        out = self._fail_queued(keys=[Keys.job(job_id), Keys.queued],
                                args=[rq_id, repr(time.time()), self.settings.result_ttl,
                                      code.value, message[:2000], job_id])
        result = _s(out) or "missing"
        if result == "ok":
            logger.error("job %s failed %s: %s", job_id, code.value, message)
        return result

    def queued_head(self, limit: int) -> list[tuple[str, int, Any]]:
        """(job id, attempt, payload) of the first `limit` queued jobs, in queue order.

        The payload is what the job hash holds, unvalidated: the worker checks it (a stored
        payload that is not even JSON comes back as its text, and fails that check)."""
        out: list[tuple[str, int, Any]] = []
        for raw in self.r.lrange(self.queue.key, 0, max(0, limit - 1)):
            rq_id = _s(raw) or ""
            job_id, sep, att = rq_id.rpartition("-a")
            if not sep or not att.isdigit():
                continue
            job = self.get(job_id)
            if job is None or job.status is not JobStatus.QUEUED or job.rq_id != rq_id:
                continue
            out.append((job_id, job.attempt, job.payload()))
        return out

    def take(self, job_id: str, rq_id: str, worker: str, model: dict[str, Any]) -> str:
        """Claim a job still waiting in the queue (removing its entry); 'ok' or why not."""
        out = self._take(keys=[Keys.job(job_id), Keys.running, self.queue.key,
                               Job.key_for(rq_id), Keys.queued],
                         args=[rq_id, worker, repr(time.time()), json.dumps(model), job_id])
        return _s(out) or "missing"

    def write_progress(self, job_id: str, attempt: int, worker: str, progress: float,
                       preview: bytes | None) -> bool:
        """Record progress (never decreasing) and the preview; False when no longer ours."""
        out = self._progress(
            keys=[Keys.job(job_id), Keys.preview(job_id)],
            args=[worker, str(attempt), repr(float(progress)), preview or b"",
                  self.settings.result_ttl, repr(time.time()), job_id],
        )
        return bool(out)

    def should_stop(self, job_id: str, attempt: int, worker: str) -> bool:
        """True when the job was canceled, expired, or handed to another attempt."""
        job = self.get(job_id)
        return not (job is not None and job.status is JobStatus.RUNNING
                    and job.worker == worker and job.attempt == attempt)

    def finish(self, job_id: str, attempt: int, worker: str, status: JobStatus,
               images: Sequence[bytes] = (), error: tuple[str, str] | None = None,
               result: Any = None) -> bool:
        """running -> succeeded/failed with PNGs or an error; False when no longer ours.

        `result` (JSON-able) is what the job computed besides its images."""
        code, message = error if error else ("", "")
        out = self._finish(
            keys=[Keys.job(job_id), Keys.running, Keys.preview(job_id),
                  *[Keys.image(job_id, n) for n in range(len(images))]],
            args=[worker, str(attempt), status.value, repr(time.time()),
                  self.settings.result_ttl, code, message[:2000], job_id,
                  "" if result is None else json.dumps(result), *images],
        )
        return bool(out)

    def requeue(self, job_id: str, attempt: int, worker: str, *, lost: bool) -> Requeue:
        """Put a running job back at the front of the queue as attempt + 1.

        `lost=True` (the reaper) counts a retry and fails the job `worker_lost` once
        `max_retries` retries are used; `lost=False` (graceful shutdown) does not count.
        Returns REQUEUED, FAILED or SKIP (the job is no longer that attempt's).
        """
        key = Keys.job(job_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hgetall(key)
                    job = JobRecord.from_hash(raw) if raw else None
                    if (job is None or job.status is not JobStatus.RUNNING
                            or job.worker != worker or job.attempt != attempt):
                        pipe.unwatch()
                        return Requeue.SKIP
                    used = job.retries
                    pipe.multi()
                    if lost and used >= self.settings.max_retries:
                        pipe.hset(key, mapping={
                            "status": JobStatus.FAILED.value, "finished_at": repr(time.time()),
                            "error_code": JobErrorCode.WORKER_LOST.value,
                            "error_message": f"worker {worker} was lost; {used} retries used",
                        })
                        # Readable for the result TTL from now, as any finished job.
                        ttl = self.settings.result_ttl
                        pipe.expire(key, ttl)
                        pipe.expire(Keys.preview(job_id), ttl)
                        if job.idem:
                            pipe.expire(job.idem, ttl)
                        if job.webhook and WebhookEvent.COMPLETED.value in job.webhook_events:
                            pipe.xadd(Keys.webhook_events, {
                                "job": job_id, "type": WebhookEvent.COMPLETED.value,
                                "at": repr(time.time())},
                                maxlen=WEBHOOK_STREAM_MAXLEN, approximate=True)
                        outcome = Requeue.FAILED
                    else:
                        new = attempt + 1
                        pipe.hset(key, mapping={
                            "status": JobStatus.QUEUED.value, "attempt": str(new),
                            "retries": str(used + 1 if lost else used),
                            "rq_id": rq_job_id(job_id, new),
                            "worker": "", "started_at": "", "progress": "0", "has_preview": "0",
                        })
                        pipe.delete(Keys.preview(job_id))
                        self._enqueue(pipe, job_id, new, job.params, job.test_hooks,
                                      at_front=True, kind=job.kind)
                        outcome = Requeue.REQUEUED
                    pipe.srem(Keys.running, job_id)
                    pipe.execute()
                    logger.warning("job %s attempt %d on worker %s: %s (%s)", job_id, attempt,
                                   worker, outcome.value, "worker lost" if lost else "shutdown")
                    return outcome
                except redis.WatchError:
                    continue
