"""Admission: a submission becomes a queued job, RQ entry included, in one Redis step
(`scripts.ADMIT`); `prepare_job` builds that step without I/O, so the API can send it
over its asyncio client."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .base import StoreBase, _s
from .record import JobRecord
from .rqentry import pack
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
from .settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedJob:
    """A submission ready for `scripts.ADMIT`: the job as it will be stored, and the
    script's keys and arguments (the RQ entry's writes included)."""

    job: JobRecord
    keys: list[str]
    args: list[Any]
    cap: int  # the caller's cap on waiting jobs (0: uncapped)


def admission_outcome(out: list[Any], prepared: PreparedJob,
                      settings: Settings) -> tuple[str, bool]:
    """(job id, created) from `scripts.ADMIT`'s answer; refusals raise `IdempotencyConflict`,
    `QueueFull` or `QuotaExceeded`."""
    outcome, found = Admission(_s(out[0])), _s(out[1]) or ""
    if outcome is Admission.EXISTING:
        return found, False
    if outcome is Admission.CONFLICT:
        raise IdempotencyConflict(found)
    if outcome is Admission.QUEUE_FULL:
        raise QueueFull(f"{settings.max_queue} jobs are waiting "
                        "(PROMPTPIX_MAX_QUEUE); retry later")
    if outcome is Admission.QUOTA_EXCEEDED:
        raise QuotaExceeded(f"{prepared.cap} jobs of this caller are waiting "
                            "(PROMPTPIX_MAX_QUEUED_PER_KEY); retry when one has started")
    job = prepared.job
    logger.info("%s job %s queued (owner %s)", job.kind.value, job.id, job.owner[:8] or "-")
    return found, True


class EnqueueOps(StoreBase):
    """Creating jobs under the queue caps and the Idempotency-Key."""

    def prepare_job(
        self,
        params: GenerationParams | ScoreParams,
        owner: str = "",
        idempotency: tuple[str, str] | None = None,
        test_hooks: dict[str, Any] | None = None,
        quota_who: str = "",
        webhook: tuple[str, list[str]] | None = None,
        upload: bytes | None = None,
    ) -> PreparedJob:
        """Everything `scripts.ADMIT` needs to admit and enqueue a job, without a round
        trip (but RQ's one read of the server version per queue, and the model lookup of a
        `params.model` of None).

        The RQ entry is RQ's own, recorded once per queue and kind against a pipeline
        that is never sent and filled in for this job (`rqentry`): its writes travel in
        the script's arguments, which replays them once the job is admitted, so admission
        and entry are one atomic step (no undo, no orphan).
        """
        kind = JobKind.SCORE if isinstance(params, ScoreParams) else JobKind.GENERATE
        if params.model is None:  # the API always names it; `resolve_model` as it would
            model = self.model or self.resolve_model(None)["id"]  # type: ignore[attr-defined]
            params = params.model_copy(update={"model": model})
        ttl = self.settings.result_ttl
        params_dict = params.model_dump(mode="json")
        job_id = secrets.token_hex(16)
        cap = self.settings.max_queued_per_key if quota_who else 0
        quota_key = Keys.queued_by(quota_who) if cap else ""
        now = time.time()
        job = JobRecord(
            id=job_id, status=JobStatus.QUEUED, attempt=1, retries=0,
            rq_id=rq_job_id(job_id, 1), owner=owner, params=params_dict,
            created_at=now, idem=idempotency[0] if idempotency else "",
            test_hooks=test_hooks or None, quota=quota_key, kind=kind,
            webhook=webhook[0] if webhook else "",
            webhook_events=tuple(webhook[1]) if webhook else (),
        )
        writes = self._entry_template(params_dict, kind).writes(job_id, now, job.payload())
        if upload is not None:  # the entry never exists without it
            writes += pack((5, "SET", Keys.upload(job_id), upload, "EX", ttl))
        job_key = Keys.job(job_id)
        return PreparedJob(
            job=job, cap=cap,
            keys=[idempotency[0] if idempotency else job_key, job_key, Keys.queued,
                  quota_key or job_key, Keys.owner_jobs(owner)],
            args=["1" if idempotency else "", idempotency[1] if idempotency else "", job_id,
                  repr(now), ttl, self.settings.max_queue, cap,
                  pack(x for kv in job.new_hash().items() for x in kv), writes],
        )

    def create_job(self, params: GenerationParams | ScoreParams,
                   **options: Any) -> tuple[str, bool]:
        """Admit and enqueue a job; return (job id, created).

        One Redis step decides and writes (`scripts.ADMIT`): with `idempotency` = (key
        name, body hash), an earlier live job under that key is returned first (created
        False) when its body hash matches, and a different body raises
        `IdempotencyConflict`; then `QueueFull` past PROMPTPIX_MAX_QUEUE waiting jobs, and
        `QuotaExceeded` past PROMPTPIX_MAX_QUEUED_PER_KEY waiting jobs of `quota_who` (the
        caller's key or address; '' = not capped), counting the jobs of every model. The
        RQ entry goes on the queue of `params.model` (None: this store's model, else the
        default or only registered one, else `ModelRequired`). `webhook` = (URL, events)
        has the job's transitions append those events (`WebhookEvent` values) to the
        webhook stream. `ScoreParams` make a `score` job (on its model's queue too);
        `upload` (the submitted image) is stored beside the job. `options` are
        `prepare_job`'s.
        """
        prepared = self.prepare_job(params, **options)
        out = self._admit(keys=prepared.keys, args=prepared.args)
        return admission_outcome(out, prepared, self.settings)

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
