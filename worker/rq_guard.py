"""What a worker accepts from the queue: only this project's job functions, nothing else.

RQ runs whatever a queue entry names (a function by dotted path, success/failure/stopped
callbacks, dependents, webhooks, retries). Anyone able to write to Redis could make a
worker import and call any function. `refusal` reads an entry's fields as plain data and
says what is wrong with it, before RQ imports anything; `fail_refused` marks the entry
failed without running any of its hooks. RQ's registry maintenance runs hooks too (the
failure callback, retry, dependents and webhooks of an abandoned entry): `clean_registries`
replaces it with one that only forgets expired entries.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.utils import current_timestamp
from rq.worker_registration import clean_worker_registry

from .protocol import JOB_FUNCS

logger = logging.getLogger(__name__)

ALLOWED_FUNCS = frozenset(JOB_FUNCS.values())
REFUSED_FAILURE_TTL_S = 86400


def _implemented(func_name: str) -> bool:
    """Whether an allowlisted job function exists here (a kind may be reserved before this
    worker implements it); looks in modules already imported, never imports one."""
    module, _, attr = func_name.rpartition(".")
    return callable(getattr(sys.modules.get(module), attr, None))


def refusal(job: Job) -> str | None:
    """Why this RQ entry must not run (None: it is a plain call of an allowed function).

    Reads stored fields only: nothing named by the entry is imported."""
    try:
        func_name, instance, args, kwargs = job.func_name, job.instance, job.args, job.kwargs
    except Exception as e:  # DeserializationError and whatever the serializer raised
        return f"its data does not deserialize ({type(e).__name__})"
    if func_name not in ALLOWED_FUNCS:
        return (f"function {str(func_name)[:200]!r} is not allowed (expected one of "
                f"{sorted(ALLOWED_FUNCS)})")
    if not _implemented(func_name):
        kind = next(k.value for k, f in JOB_FUNCS.items() if f == func_name)
        return f"job kind {kind!r} ({func_name}) is not served by this worker"
    if instance is not None:
        return "it names a method of a stored instance"
    if len(args) != 1 or not isinstance(args[0], dict) or kwargs:
        return "its arguments are not one payload dict"
    hooks = {
        "on_success callback": job._success_callback_name,
        "on_failure callback": job._failure_callback_name,
        "on_stopped callback": job._stopped_callback_name,
        "dependencies": job._dependency_ids,
        "webhooks": job.webhooks,
        "retries": job.retries_left,
        "repeats": job.repeats_left,
        "meta": job.meta,
    }
    present = [name for name, value in hooks.items() if value]
    if present:
        return f"it carries {', '.join(present)}"
    return None


def fail_refused(job: Job, queue: Queue, reason: str) -> None:
    """Record a refused entry as failed (RQ's failed registry) without running its hooks:
    no callback, no dependents enqueued, no webhook, no retry."""
    message = f"refused by the promptpix worker: {reason}"
    with job.connection.pipeline() as pipe:
        pipe.lrem(queue.intermediate_queue_key, 1, job.id)
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        FailedJobRegistry(queue.name, connection=job.connection, serializer=queue.serializer).add(
            job, ttl=REFUSED_FAILURE_TTL_S, exc_string=message, pipeline=pipe)
        pipe.execute()


def entry_fields(job: Job) -> dict[str, Any]:
    """A refused entry's fields for the log (texts cut short; values never executed)."""
    try:
        func = str(job.func_name)[:200]
    except Exception:
        func = "<undeserializable>"
    return {"rq_id": job.id, "func": func, "origin": job.origin}


def clean_registries(queue: Queue) -> None:
    """RQ's registry maintenance without running anything an entry names.

    Expired entries of the finished, failed and started registries are dropped; the jobs
    behind abandoned started entries are recovered by the promptpix reaper (which reads
    the job hashes, never RQ's hooks). Deferred, ready and group registries are left alone:
    this project enqueues no dependencies, groups or schedules."""
    r = queue.connection
    kw = {"connection": r, "serializer": queue.serializer}
    FinishedJobRegistry(queue.name, **kw).cleanup()
    FailedJobRegistry(queue.name, **kw).cleanup()
    r.zremrangebyscore(queue.started_job_registry.key, 0, current_timestamp())
    clean_worker_registry(queue)
