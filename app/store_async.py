"""The API's hot path over `redis.asyncio`: status reads and admissions on the event loop.

One client (one connection pool) per app, made at start-up. A status read is one round
trip (`scripts.STATUS`: the job hash and its queue position), a submission one more
(`scripts.ADMIT`, the RQ entry included), so neither holds a thread-pool slot. The
model registry is read at most once per `MODEL_FACTS_TTL_S` (and again whenever a
request names a model it does not hold, so a newly registered model is found at once).
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis
from rq import Queue

from worker.protocol import (
    GenerationParams,
    JobRecord,
    JobStore,
    Keys,
    ModelNotFound,
    ModelRequired,
    NoModelRegistered,
    ScoreParams,
    queue_name,
)
from worker.protocol.enqueue import admission_outcome
from worker.protocol.registry import model_facts, resolve_in
from worker.protocol.scripts import ADMIT, STATUS

MODEL_FACTS_TTL_S = 1.0
# `rq:queue:generate:`: STATUS appends the job's model.
_QUEUE_PREFIX = Queue.redis_queue_namespace_prefix + queue_name("")


class AsyncStore:
    """Status reads, model resolution and admissions for the API (`store` builds the
    admission; this sends it)."""

    def __init__(self, connection: aioredis.Redis, store: JobStore) -> None:
        self.r = connection
        self.store = store
        self.settings = store.settings
        self._status = connection.register_script(STATUS)
        self._admit = connection.register_script(ADMIT)
        self._facts: dict[str, dict[str, Any]] = {}
        self._facts_at = -MODEL_FACTS_TTL_S

    async def get(self, job_id: str) -> JobRecord | None:
        """The job (None when unknown or expired)."""
        raw = await self.r.hgetall(Keys.job(job_id))
        return JobRecord.from_hash(raw) if raw else None

    async def status(self, job_id: str) -> tuple[JobRecord | None, int | None]:
        """The job and, while it is queued, its 0-based position in its model's queue
        (None when not in it): one round trip."""
        raw, pos = await self._status(keys=[Keys.job(job_id)], args=[_QUEUE_PREFIX])
        if not raw:
            return None, None
        job = JobRecord.from_hash(dict(zip(raw[::2], raw[1::2], strict=True)))
        return job, (None if int(pos) < 0 else int(pos))

    async def _models(self, fresh: bool) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        if fresh or now - self._facts_at >= MODEL_FACTS_TTL_S:
            self._facts = model_facts(await self.r.hgetall(Keys.models), self.settings)
            self._facts_at = now
        return self._facts

    async def resolve_model(self, requested: str | None) -> dict[str, Any]:
        """`registry.resolve_in` over the (briefly cached) registry; a refusal is checked
        again against the registry as it is now before it is raised."""
        try:
            return resolve_in(await self._models(fresh=False), requested, self.settings)
        except (ModelRequired, ModelNotFound, NoModelRegistered):
            return resolve_in(await self._models(fresh=True), requested, self.settings)

    async def create_job(self, params: GenerationParams | ScoreParams,
                         **options: Any) -> tuple[JobRecord, bool]:
        """`JobStore.create_job` in one round trip; returns the job (as written when
        created, else the earlier job under the Idempotency-Key, None-safe: raises
        `LookupError` when that one expired meanwhile) and whether it was created."""
        prepared = self.store.prepare_job(params, **options)
        out = await self._admit(keys=prepared.keys, args=prepared.args)
        job_id, created = admission_outcome(out, prepared, self.settings)
        if created:
            return prepared.job, True
        job = await self.get(job_id)
        if job is None:  # expired between the two reads: only with a tiny RESULT_TTL
            raise LookupError(job_id)
        return job, False
