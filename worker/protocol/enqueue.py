"""Admission: a submission becomes a queued job in one Redis step (`scripts.ADMIT`), then
its RQ entry is written."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any

import redis

from .base import StoreBase, _s
from .record import JobRecord
from .schema import (
    Admission,
    GenerationParams,
    IdempotencyConflict,
    JobKind,
    JobStatus,
    Keys,
    QueueFull,
    QuotaExceeded,
    ScoreParams,
    rq_job_id,
)

logger = logging.getLogger(__name__)


class EnqueueOps(StoreBase):
    """Creating jobs under the queue caps and the Idempotency-Key."""

    def create_job(
        self,
        params: GenerationParams | ScoreParams,
        owner: str = "",
        idempotency: tuple[str, str] | None = None,
        test_hooks: dict[str, Any] | None = None,
        quota_who: str = "",
        webhook: tuple[str, list[str]] | None = None,
        upload: bytes | None = None,
    ) -> tuple[str, bool]:
        """Admit and enqueue a job; return (job id, created).

        One Redis step decides (`scripts.ADMIT`): with `idempotency` = (idempotency key
        name, body hash), an earlier live job under that key is returned first (created
        False) when its body hash matches, and a different body raises
        `IdempotencyConflict`; then `QueueFull` past PROMPTPIX_MAX_QUEUE waiting jobs, and
        `QuotaExceeded` past PROMPTPIX_MAX_QUEUED_PER_KEY waiting jobs of `quota_who` (the
        caller's key or address; '' = not capped), counting the jobs of every model. The
        RQ entry follows on the queue of `params.model` (None: this store's model, else
        the default or only registered one, else `ModelRequired`); if that write fails, the
        admission is undone. `webhook` = (URL, events) has the job's transitions append
        those events (`WebhookEvent` values) to the webhook stream. `ScoreParams` make a
        `score` job (on its model's queue too); `upload` (the submitted image) is stored
        beside the job, in the RQ entry's step.
        """
        kind = JobKind.SCORE if isinstance(params, ScoreParams) else JobKind.GENERATE
        if params.model is None:  # the API always names it; `resolve_model` as it would
            model = self.model or self.resolve_model(None)["id"]  # type: ignore[attr-defined]
            params = params.model_copy(update={"model": model})
        ttl = self.settings.result_ttl
        params_dict = params.model_dump(mode="json")
        job_id = uuid.uuid4().hex
        cap = self.settings.max_queued_per_key if quota_who else 0
        quota_key = Keys.queued_by(quota_who) if cap else ""
        fields = JobRecord(
            id=job_id, status=JobStatus.QUEUED, attempt=1, retries=0,
            rq_id=rq_job_id(job_id, 1), owner=owner, params=params_dict,
            created_at=time.time(), idem=idempotency[0] if idempotency else "",
            test_hooks=test_hooks or None, quota=quota_key, kind=kind,
            webhook=webhook[0] if webhook else "",
            webhook_events=tuple(webhook[1]) if webhook else (),
        ).new_hash()
        job_key = Keys.job(job_id)
        out = self._admit(
            keys=[idempotency[0] if idempotency else job_key, job_key, Keys.queued,
                  quota_key or job_key, Keys.owner_jobs(owner)],
            args=["1" if idempotency else "", idempotency[1] if idempotency else "", job_id,
                  repr(time.time()), ttl, self.settings.max_queue, cap,
                  *[x for kv in fields.items() for x in kv]],
        )
        outcome, found = Admission(_s(out[0])), _s(out[1]) or ""
        if outcome is Admission.EXISTING:
            return found, False
        if outcome is Admission.CONFLICT:
            raise IdempotencyConflict(found)
        if outcome is Admission.QUEUE_FULL:
            raise QueueFull(f"{self.settings.max_queue} jobs are waiting "
                            "(PROMPTPIX_MAX_QUEUE); retry later")
        if outcome is Admission.QUOTA_EXCEEDED:
            raise QuotaExceeded(f"{cap} jobs of this caller are waiting "
                                "(PROMPTPIX_MAX_QUEUED_PER_KEY); retry when one has started")
        try:
            with self.r.pipeline() as pipe:
                self._enqueue(pipe, job_id, 1, params_dict, test_hooks, at_front=False,
                              kind=kind)
                if upload is not None:  # in RQ's MULTI: the entry never exists without it
                    pipe.set(Keys.upload(job_id), upload, ex=ttl)
                pipe.execute()
        except redis.RedisError:
            # Undo the admission (best effort: a crash here leaves a `queued` job without an
            # entry, which the reaper's orphan sweep enqueues).
            with contextlib.suppress(redis.RedisError), self.r.pipeline() as pipe:
                pipe.delete(job_key, Keys.upload(job_id))
                pipe.zrem(Keys.queued, job_id)
                pipe.zrem(Keys.owner_jobs(owner), job_id)
                if quota_key:
                    pipe.zrem(quota_key, job_id)
                if idempotency:
                    pipe.delete(idempotency[0])
                pipe.execute()
            raise
        logger.info("%s job %s queued (owner %s)", kind.value, job_id, owner[:8] or "-")
        return job_id, True

    def list_jobs(self, owner: str, limit: int, cursor: tuple[float, str] | None = None,
                  status: str | None = None, scan: int = 1000,
                  kind: JobKind | None = None,
                  ) -> tuple[list[JobRecord], tuple[float, str] | None]:
        """An owner's jobs, newest first: up to `limit` (with `status` only, of `kind`
        only when given), after `cursor`
        (the (created_at, id) of the last job of the previous page). Looks at no more than
        `scan` entries per call, so a rare status cannot make one call read everything.
        Returns the jobs and the cursor of the next page (None: no more)."""
        key = Keys.owner_jobs(owner)
        out: list[JobRecord] = []
        top: float | str = "+inf" if cursor is None else cursor[0]
        last: tuple[float, str] | None = cursor
        looked = 0
        while len(out) < limit and looked < scan:
            batch = self.r.zrevrangebyscore(key, top, "-inf", start=0,
                                            num=min(scan, 2 * limit + 10), withscores=True)
            fresh = [((_s(m) or ""), float(sc)) for m, sc in batch]
            if last is not None:  # equal times: members after the cursor's, in reverse order
                fresh = [(m, sc) for m, sc in fresh
                         if sc < last[0] or (sc == last[0] and m < last[1])]
            if not fresh:
                return out, None
            with self.r.pipeline(transaction=False) as pipe:
                for m, _ in fresh:
                    pipe.hgetall(Keys.job(m))
                raws = pipe.execute()
            gone = []
            for (m, sc), raw in zip(fresh, raws, strict=True):
                looked += 1
                last = (sc, m)
                if not raw:
                    gone.append(m)
                    continue
                job = JobRecord.from_hash(raw)
                if ((status is None or job.status.value == status)
                        and (kind is None or job.kind is kind)):
                    out.append(job)
                    if len(out) == limit:
                        break
            if gone:
                self.r.zrem(key, *gone)
            top = last[0]
        return out, last
