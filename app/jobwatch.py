"""Watching jobs without a thread: the app's `redis.asyncio` client and job reads.

Waiting routes (the OpenAI sync route, its stream, the event streams) poll the job hash
with this client every `WATCH_INTERVAL_S`, so a waiting request holds no thread-pool slot.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Request

from worker.protocol import JobRecord, JobStatus, Keys, Settings, async_redis_connection
from worker.protocol.schema import KEY_PREFIX

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.1
URL_SECRET_KEY = f"{KEY_PREFIX}:url_secret"
FINISHED = frozenset(s for s in JobStatus if s.finished)

# Writes `field` only on a job that still exists, so an expired job is not re-created
# without a TTL. KEYS: job hash. ARGV: field, value.
_HSET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


def async_redis(app: FastAPI) -> aioredis.Redis:
    """The app's asyncio Redis client (made on first use, closed by `close_async_redis`)."""
    client = getattr(app.state, "aredis", None)
    if client is None:
        settings: Settings = app.state.settings
        client = async_redis_connection(settings)
        app.state.aredis = client
    return client  # type: ignore[no-any-return]


async def close_async_redis(app: FastAPI) -> None:
    """Close the client made by `async_redis`, if any (app shutdown)."""
    client = getattr(app.state, "aredis", None)
    if client is not None:
        app.state.aredis = None
        await client.aclose()


def request_redis(request: Request) -> aioredis.Redis:
    """`async_redis` of the request's app."""
    return async_redis(request.app)


async def read_job(r: aioredis.Redis, job_id: str) -> JobRecord | None:
    """The job, or None when unknown or expired."""
    raw = await r.hgetall(Keys.job(job_id))
    return JobRecord.from_hash(raw) if raw else None


def _owned(job: JobRecord | None, owner: str) -> JobRecord | None:
    return job if job is not None and hmac.compare_digest(job.owner, owner) else None


async def owned_job(r: aioredis.Redis, job_id: str, owner: str) -> JobRecord | None:
    """The job when it exists and belongs to `owner` (constant-time compare)."""
    return _owned(await read_job(r, job_id), owner)


async def owned_jobs(r: aioredis.Redis, job_ids: list[str],
                     owner: str) -> list[JobRecord | None]:
    """`owned_job` of each id, in one round trip."""
    async with r.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hgetall(Keys.job(job_id))
        raws = await pipe.execute()
    return [_owned(JobRecord.from_hash(raw) if raw else None, owner) for raw in raws]


async def set_label(r: aioredis.Redis, job_id: str, field: str, value: str) -> bool:
    """Record a label (e.g. OpenAI's `user`) on an existing job hash."""
    return bool(await r.eval(_HSET_IF_EXISTS, 1, Keys.job(job_id), field, value))


async def get_blob(r: aioredis.Redis, key: str) -> bytes | None:
    """A stored PNG, or None."""
    value = await r.get(key)
    return bytes(value) if value is not None else None


def rows_total(job: JobRecord) -> int:
    """Image height (rows) of the model the job runs on; 0 before a worker takes it."""
    return int((job.model or {}).get("image_size") or 0)


def rows_done(job: JobRecord) -> int:
    """Rows sampled so far (from the stored progress fraction)."""
    total = rows_total(job)
    return min(total, round(job.progress * total))


async def url_secret(app: FastAPI) -> bytes:
    """The key that signs image URLs: PROMPTPIX_URL_SECRET, else one random secret kept in
    Redis (made once, shared by every replica using that Redis; lost with a Redis flush,
    which also loses the images)."""
    cached = getattr(app.state, "url_secret", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    settings: Settings = app.state.settings
    if settings.url_secret is not None:
        secret = settings.url_secret.get_secret_value().encode()
    else:
        r = async_redis(app)
        if await r.set(URL_SECRET_KEY, secrets.token_hex(32), nx=True):
            logger.info("PROMPTPIX_URL_SECRET unset: made a random URL signing secret in "
                        "Redis (%s), shared by every API replica", URL_SECRET_KEY)
        secret = bytes(await r.get(URL_SECRET_KEY) or b"")
    app.state.url_secret = secret
    return secret


def json_of(data: Any) -> str:
    """Compact JSON for SSE `data:` lines."""
    return json.dumps(data, separators=(",", ":"))
