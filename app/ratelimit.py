"""Fixed-window request counters in Redis: the API's rate limit and failed-auth limit.

Both fail open: when Redis refuses the count (full under `noeviction`, or unreachable),
the request goes on and is answered by whatever it needs next (a read of a stored job
still works on a full Redis; a submission gets 503 `storage_full`). A limiter must never
be the reason a request fails.
"""

from __future__ import annotations

import logging
import math
import time

import redis
import redis.asyncio as aioredis

from worker.protocol.schema import KEY_PREFIX

logger = logging.getLogger(__name__)

WINDOW_S = 60


def window_key(kind: str, who: str, window: int) -> str:
    """Redis key of one counter: `promptpix:<kind>:<who>:<window>`."""
    return f"{KEY_PREFIX}:{kind}:{who}:{window}"


class WindowCounter:
    """Counts events per `who` in one-minute windows (`kind` names the counter family)."""

    def __init__(self, connection: aioredis.Redis, kind: str) -> None:
        self.r = connection
        self.kind = kind
        self._failing = False

    async def hit(self, who: str, limit: int, now: float | None = None) -> int | None:
        """Count one event (one round trip); seconds to wait when the window's count is
        over `limit`.

        None (not limited) also when Redis cannot count it: logged once per outage.
        """
        now = time.time() if now is None else now
        window = int(now // WINDOW_S)
        key = window_key(self.kind, who, window)
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, WINDOW_S + 1)
                count, _ = await pipe.execute()
        except redis.RedisError as e:
            if not self._failing:
                logger.warning("%s counter off while Redis refuses it (%s): failing open",
                               self.kind, e)
            self._failing = True
            return None
        self._failing = False
        if int(count) > limit:
            return max(1, math.ceil((window + 1) * WINDOW_S - now))
        return None
