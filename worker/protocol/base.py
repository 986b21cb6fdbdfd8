"""What every part of the job store shares: the connection, the RQ queue, the scripts,
and the reads (the job record, its blobs, the queue)."""

from __future__ import annotations

from typing import Any

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from .record import JobRecord
from .schema import JOB_FUNCS, QUEUE_NAME, JobKind, Keys, rq_job_id
from .scripts import ADMIT, CANCEL, CLAIM, FAIL_QUEUED, FINISH, PROGRESS, TAKE
from .settings import Settings

RQ_RESULT_TTL = 0  # the job hash is the record; RQ deletes its own job on success


def _s(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


class StoreBase:
    """The connection, settings, RQ queue and registered scripts; the plain reads."""

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self.r = connection
        self.settings = settings
        self.queue = Queue(QUEUE_NAME, connection=connection, serializer=JSONSerializer)
        self._claim = connection.register_script(CLAIM)
        self._progress = connection.register_script(PROGRESS)
        self._finish = connection.register_script(FINISH)
        self._cancel = connection.register_script(CANCEL)
        self._take = connection.register_script(TAKE)
        self._fail_queued = connection.register_script(FAIL_QUEUED)
        self._admit = connection.register_script(ADMIT)

    def get(self, job_id: str) -> JobRecord | None:
        """The job (None when unknown or expired): the one place job hashes are read."""
        raw = self.r.hgetall(Keys.job(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def queue_position(self, rq_id: str) -> int | None:
        """0-based position of an RQ job id in the queue (None when not in it)."""
        pos = self.r.lpos(self.queue.key, rq_id)
        return None if pos is None else int(pos)

    def queue_depth(self) -> int:
        """Jobs waiting in the queue."""
        return int(self.r.llen(self.queue.key))

    def get_blob(self, key: str) -> bytes | None:
        """A stored PNG (image or preview) or None."""
        value = self.r.get(key)
        return bytes(value) if value is not None else None

    def _enqueue(self, pipe: Any, job_id: str, attempt: int, params: dict[str, Any],
                 test_hooks: dict[str, Any] | None, at_front: bool,
                 kind: JobKind = JobKind.GENERATE) -> str:
        payload: dict[str, Any] = {"job_id": job_id, "attempt": attempt, "params": params}
        if kind is not JobKind.GENERATE:
            payload["kind"] = kind.value
        if test_hooks:
            payload["test_hooks"] = test_hooks
        rq_id = rq_job_id(job_id, attempt)
        self.queue.enqueue_call(
            JOB_FUNCS[kind], args=(payload,), job_id=rq_id, timeout=self.settings.job_timeout,
            ttl=self.settings.result_ttl, result_ttl=RQ_RESULT_TTL,
            failure_ttl=self.settings.result_ttl, at_front=at_front, pipeline=pipe,
            description=f"{kind.value} {job_id} attempt {attempt}",
        )
        return rq_id
