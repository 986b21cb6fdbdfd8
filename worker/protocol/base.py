"""What every part of the job store shares: the connection, the RQ queue, the scripts,
and the reads (the job record, its blobs, the queue)."""

from __future__ import annotations

from typing import Any

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from .record import JobRecord
from .rqentry import TEMPLATE_JOB_ID, RqEntryTemplate
from .schema import JOB_FUNCS, JobKind, Keys, ProtocolError, queue_name, rq_job_id
from .scripts import ADMIT, CANCEL, CLAIM, FAIL_QUEUED, FINISH, PROGRESS, TAKE
from .settings import Settings

RQ_RESULT_TTL = 0  # the job hash is the record; RQ deletes its own job on success


def _s(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


def job_model(job: JobRecord) -> str:
    """The model id a job asked for ('' for a job stored before models had names)."""
    params = job.params if isinstance(job.params, dict) else {}
    model = params.get("model")
    return model if isinstance(model, str) else ""


class StoreBase:
    """The connection, settings, RQ queues (one per model) and registered scripts; the
    plain reads. `model` is the model a worker serves (None in the API)."""

    def __init__(self, connection: redis.Redis, settings: Settings,
                 model: str | None = None) -> None:
        self.r = connection
        self.settings = settings
        self.model = model
        self._queues: dict[str, Queue] = {}
        self._templates: dict[tuple[str, JobKind], RqEntryTemplate] = {}
        self._claim = connection.register_script(CLAIM)
        self._progress = connection.register_script(PROGRESS)
        self._finish = connection.register_script(FINISH)
        self._cancel = connection.register_script(CANCEL)
        self._take = connection.register_script(TAKE)
        self._fail_queued = connection.register_script(FAIL_QUEUED)
        self._admit = connection.register_script(ADMIT)

    def queue_for(self, model: str) -> Queue:
        """The RQ queue of `model`'s jobs (`generate:<model>`)."""
        q = self._queues.get(model)
        if q is None:
            q = Queue(queue_name(model), connection=self.r, serializer=JSONSerializer)
            self._queues[model] = q
        return q

    @property
    def queue(self) -> Queue:
        """The queue of the model this store's worker serves."""
        if not self.model:
            raise ProtocolError("this store serves no model: use queue_for(model)")
        return self.queue_for(self.model)

    def job_queue(self, job: JobRecord) -> Queue:
        """The queue a job waits in: its model's (this worker's for a job without one)."""
        model = job_model(job) or self.model
        if not model:
            raise ProtocolError(f"job {job.id} names no model and this store serves none")
        return self.queue_for(model)

    def get(self, job_id: str) -> JobRecord | None:
        """The job (None when unknown or expired): the one place job hashes are read."""
        raw = self.r.hgetall(Keys.job(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def queue_position(self, job: JobRecord) -> int | None:
        """0-based position of a job's current attempt in its model's queue (None when not
        in it)."""
        pos = self.r.lpos(self.job_queue(job).key, job.rq_id)
        return None if pos is None else int(pos)

    def known_models(self) -> list[str]:
        """Ids of every registered model, every one PROMPTPIX_MODELS declares, and this
        store's own."""
        known = {_s(k) or "" for k in self.r.hkeys(Keys.models)}
        known |= set(self.settings.declared_models) | ({self.model} if self.model else set())
        return sorted(known)

    def queue_depths(self) -> dict[str, int]:
        """Jobs waiting in each known model's queue."""
        names = self.known_models()
        with self.r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(self.queue_for(name).key)
            return dict(zip(names, (int(n) for n in pipe.execute()), strict=True))

    def queue_depth(self) -> int:
        """Jobs waiting in the queues of all models."""
        return sum(self.queue_depths().values())

    def get_blob(self, key: str) -> bytes | None:
        """A stored PNG (image or preview) or None."""
        value = self.r.get(key)
        return bytes(value) if value is not None else None

    def _params_queue(self, params: dict[str, Any]) -> Queue:
        """The queue of the model `params` name (this worker's when none)."""
        model = params.get("model") if isinstance(params, dict) else None
        return self.queue_for(model) if isinstance(model, str) and model else self.queue

    def _entry_template(self, params: dict[str, Any], kind: JobKind) -> RqEntryTemplate:
        """The RQ entry of an attempt-1 job of `kind` on the queue of `params`' model, as
        RQ records it (once per queue and kind; `rqentry`)."""
        queue = self._params_queue(params)
        template = self._templates.get((queue.name, kind))
        if template is None:
            with self.r.pipeline(transaction=False) as recorder:
                self._enqueue(recorder, TEMPLATE_JOB_ID, 1, params, None, at_front=False,
                              kind=kind)
                template = RqEntryTemplate([a for a, _ in recorder.command_stack],
                                           JOB_FUNCS[kind])
            self._templates[(queue.name, kind)] = template
        return template

    def _enqueue(self, pipe: Any, job_id: str, attempt: int, params: dict[str, Any],
                 test_hooks: dict[str, Any] | None, at_front: bool,
                 kind: JobKind = JobKind.GENERATE) -> str:
        """Write the RQ entry of one attempt on the queue of the job's model."""
        payload: dict[str, Any] = {"job_id": job_id, "attempt": attempt, "params": params}
        if kind is not JobKind.GENERATE:
            payload["kind"] = kind.value
        if test_hooks:
            payload["test_hooks"] = test_hooks
        rq_id = rq_job_id(job_id, attempt)
        self._params_queue(params).enqueue_call(
            JOB_FUNCS[kind], args=(payload,), job_id=rq_id, timeout=self.settings.job_timeout,
            ttl=self.settings.result_ttl, result_ttl=RQ_RESULT_TTL,
            failure_ttl=self.settings.result_ttl, at_front=at_front, pipeline=pipe,
            description=f"{kind.value} {job_id} attempt {attempt}",
        )
        return rq_id
