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
        upload: bytes | None = None,
    ) -> tuple[str, bool]:
        """Admit and enqueue a job; return (job id, created).

        One Redis step decides (`scripts.ADMIT`): with `idempotency` = (idempotency key
        name, body hash), an earlier live job under that key is returned first (created
        False) when its body hash matches, and a different body raises
        `IdempotencyConflict`; then `QueueFull` past PROMPTPIX_MAX_QUEUE waiting jobs, and
        `QuotaExceeded` past PROMPTPIX_MAX_QUEUED_PER_KEY waiting jobs of `quota_who` (the
        caller's key or address; '' = not capped). The RQ entry follows; if that write
        fails, the admission is undone. `ScoreParams` make a `score` job; `upload` (the
        submitted image) is stored beside the job, in the RQ entry's step.
        """
        kind = JobKind.SCORE if isinstance(params, ScoreParams) else JobKind.GENERATE
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
        ).new_hash()
        job_key = Keys.job(job_id)
        out = self._admit(
            keys=[idempotency[0] if idempotency else job_key, job_key, Keys.queued,
                  quota_key or job_key],
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
                if quota_key:
                    pipe.zrem(quota_key, job_id)
                if idempotency:
                    pipe.delete(idempotency[0])
                pipe.execute()
            raise
        logger.info("%s job %s queued (owner %s)", kind.value, job_id, owner[:8] or "-")
        return job_id, True
