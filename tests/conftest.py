"""Shared fixtures: a real redis-server on a free port, tiny model configs."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Tests run on 2 cores next to other processes; keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[object]:
    """A real redis-server for the whole session (flush between tests with `redis_url`)."""
    from app.redis_server import RedisServer

    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: object) -> Iterator[str]:
    """URL of the session's real Redis, flushed before each test."""
    import redis

    url = redis_server.url  # type: ignore[attr-defined]
    redis.Redis.from_url(url).flushall()
    yield url
