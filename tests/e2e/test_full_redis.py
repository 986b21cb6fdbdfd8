"""A full Redis (`maxmemory` + `noeviction`, the compose default) as the API sees it: a real
`redis-server --maxmemory 2mb`, a real worker that finishes a job first, a real uvicorn.

Submissions get 503 `storage_full` with Retry-After; reads of stored jobs and PNGs keep
working (the rate limiter's refused INCR fails open); submissions work again once memory
is freed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from app.redis_server import RedisServer, free_port
from tests.e2e.test_serving import tiny_checkpoint  # noqa: F401 - shared session fixture
from tests.worker.helpers import finished, poll_job, start_api, start_worker, wait_worker_ready

FILLER = b"x" * 32 * 1024


@pytest.fixture
def small_redis() -> Iterator[RedisServer]:
    server = RedisServer(maxmemory="2mb").start()
    yield server
    server.cleanup()


def fill(r: redis.Redis) -> int:
    """Write filler keys until Redis refuses; the number written."""
    n = 0
    while True:
        try:
            r.set(f"filler:{n}", FILLER)
        except redis.exceptions.OutOfMemoryError:
            return n
        n += 1


def test_full_redis_refuses_submissions_and_keeps_serving_reads(
        small_redis: RedisServer, tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    port = free_port()
    api = start_api(small_redis.url, port, tmp_path / "api.log")
    worker = start_worker(small_redis.url, tiny_checkpoint, tmp_path / "worker.log")
    try:
        wait_worker_ready(small_redis.url, worker)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        r = http.post("/v1/generations", json={"prompt": "a red square", "num_images": 2,
                                                "seed": 5})
        assert r.status_code == 202, r.text
        job = poll_job(http, r.json()["id"], finished)
        assert job["status"] == "succeeded", job
        png = http.get(job["images"][1]).content
        worker.stop()  # only the API is under test here

        conn = redis.Redis.from_url(small_redis.url)
        written = fill(conn)
        assert written > 0
        t0 = time.monotonic()
        refused = http.post("/v1/generations", json={"prompt": "a blue square"})
        took = time.monotonic() - t0
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "storage_full"
        assert int(refused.headers["Retry-After"]) > 0
        # The OpenAI-compatible route refuses in OpenAI's error shape, which the SDK reads.
        openai = http.post("/v1/images/generations", json={"prompt": "a blue square"})
        assert openai.status_code == 503, openai.text
        assert openai.json()["error"]["code"] == "storage_full", openai.text
        assert openai.json()["error"]["type"] == "server_error", openai.text
        assert int(openai.headers["Retry-After"]) > 0
        # Reads go on: the job, its PNGs, the model list; many of them, past any window.
        for _ in range(5):
            assert http.get(f"/v1/generations/{job['id']}").json()["status"] == "succeeded"
            assert http.get(job["images"][1]).content == png
        assert http.get("/v1/models").status_code == 200
        assert http.get("/readyz?scope=api").status_code in (200, 503)  # answers, no 500
        assert "Traceback" not in api.log(), api.log()

        conn.delete(*[f"filler:{n}" for n in range(written)])
        again = http.post("/v1/generations", json={"prompt": "a blue square"})
        assert again.status_code == 202, again.text
        print(f"filled with {written} x 32 KiB; refused in {took * 1000:.0f} ms")
    finally:
        worker.stop()
        api.stop()
