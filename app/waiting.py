"""`Prefer: wait=N` (RFC 7240): hold a submission's answer until its job ends, on the event
loop (redis.asyncio), never in a thread-pool slot.

A client that disconnects while waiting cancels only the wait, never the job.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import redis
import redis.asyncio as aioredis
from fastapi import Request

from worker.protocol import JobStatus, Keys

logger = logging.getLogger(__name__)

MAX_WAIT_S = 60  # API.md: N is clamped to 60
POLL_FIRST_S, POLL_LONGEST_S = 0.05, 0.25  # status reads back off from 50 to 250 ms
_WAIT = re.compile(r"(?:^|[,;])\s*wait\s*=\s*\"?(\d+)\"?\s*(?=[,;]|$)", re.IGNORECASE)
_FINISHED = {s.value.encode() for s in JobStatus if s.finished}


def prefer_wait(request: Request) -> int:
    """Seconds a `Prefer: wait=N` header asks for (clamped to MAX_WAIT_S; 0 = no wait)."""
    best = 0
    for value in request.headers.getlist("prefer"):
        for match in _WAIT.finditer(value):
            digits = match.group(1)  # int() of a huge one would raise (4,300-digit limit)
            best = max(best, MAX_WAIT_S if len(digits) > 6 else min(MAX_WAIT_S, int(digits)))
    return best


async def wait_until_finished(client: aioredis.Redis, job_id: str, seconds: float) -> bool:
    """Whether the job reached a final state within `seconds` (reads its status field over
    the app's shared asyncio client).

    A Redis error ends the wait early (the caller answers 202 as without waiting)."""
    deadline = time.monotonic() + seconds
    pause = POLL_FIRST_S
    try:
        while True:
            status = await client.hget(Keys.job(job_id), "status")
            if status is None or status in _FINISHED:
                return status is not None
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(pause, left))
            pause = min(POLL_LONGEST_S, pause * 2)
    except redis.RedisError as e:
        logger.warning("job %s: stopped waiting (Redis: %s)", job_id, e)
        return False
