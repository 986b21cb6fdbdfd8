"""The service's Redis client, and how to tell a full Redis from other refusals."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from .settings import Settings


def storage_full(error: BaseException) -> bool:
    """Whether Redis refused a write because it is full (`maxmemory` with `noeviction`)."""
    # Inside a Lua script the refusal comes back as a script error quoting Redis's text;
    # inside MULTI, as EXECABORT naming it.
    return isinstance(error, redis.ResponseError) and (
        isinstance(error, redis.exceptions.OutOfMemoryError) or "OOM" in str(error))


# One quick retry covers a pooled socket that died with a Redis restart; more would only
# delay the 503 a client gets while Redis is down.
_RETRY_BACKOFF = {"cap": 0.05, "base": 0.01}
_CLIENT = {"socket_connect_timeout": 2.0, "health_check_interval": 30}


def redis_connection(settings: Settings, *, blocking: bool = False) -> redis.Redis:
    """A Redis client for the service: bytes in and out, short connect timeout.

    `blocking=True` (the RQ worker's connection) leaves the read timeout to RQ, whose
    BLMOVE waits longer than any fixed socket timeout we would pick.
    """
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        settings.redis_url, socket_timeout=None if blocking else 5.0,
        retry=Retry(ExponentialBackoff(**_RETRY_BACKOFF), 1), **_CLIENT)


def async_redis_connection(settings: Settings) -> aioredis.Redis:
    """`redis_connection`'s asyncio twin (the API's event-loop client), same timeouts and
    the same one quick retry."""
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    return aioredis.Redis.from_url(
        settings.redis_url, socket_timeout=5.0,
        retry=Retry(ExponentialBackoff(**_RETRY_BACKOFF), 1), **_CLIENT)
