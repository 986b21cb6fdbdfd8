"""Issue 14 item 8, worker side: a worker facing a full Redis (`maxmemory` + `noeviction`).

A real redis-server limited to 2 MB and a real worker. Redis fills up while a job samples:
the final write is refused. The worker must keep the finished images and retry, keep its
heartbeat alive (PEXPIRE is allowed when SET is not), never exit, and finish the job as the
same attempt once there is room. Figures (bytes per job and per image) go to
docs/reliability.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from app.redis_server import RedisServer
from tests.worker.helpers import (
    Proc,
    make_tiny_checkpoint,
    start_worker,
    wait_for,
    wait_worker_ready,
)
from worker.protocol import GenerationParams, JobStore, Keys, Settings, rq_job_id

MAXMEMORY = "2mb"
FULL_FOR_S = 5.0  # > 3 heartbeat TTLs of FAST_LIVENESS (1.5 s): a lost heartbeat would show


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.getbasetemp() / "tiny_serving.pth")


@pytest.fixture
def small_redis() -> Iterator[RedisServer]:
    """A real redis-server refusing writes past 2 MB (noeviction is RedisServer's policy)."""
    server = RedisServer().start()
    r = redis.Redis.from_url(server.url)
    r.config_set("maxmemory", MAXMEMORY)
    assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    yield server
    server.cleanup()


def fill(r: redis.Redis) -> int:
    """Write filler keys until even a 100-byte write is refused; return how many.

    Then hold it full: `used_memory` moves by a few KB as client buffers come and go, so
    `maxmemory` is set 256 KB under what is used (the state is the same: noeviction refusing
    every write that may grow memory)."""
    n = 0
    for size in (20000, 2000, 100):
        while True:
            try:
                r.set(f"filler:{n}", b"x" * size)
                n += 1
            except redis.exceptions.OutOfMemoryError:
                break
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) - 256 * 1024)
    return n


def _store_and_worker(url: str, checkpoint: Path,
                      tmp_path: Path) -> tuple[redis.Redis, JobStore, Proc]:
    r = redis.Redis.from_url(url)
    store = JobStore(r, Settings(redis_url=url), model=checkpoint.stem)
    return r, store, start_worker(url, checkpoint, tmp_path / "w.log")


def _make_room(r: redis.Redis, fillers: int) -> None:
    """Undo `fill`: its filler keys deleted, maxmemory back to the server's."""
    r.delete(*[f"filler:{i}" for i in range(fillers)])
    r.config_set("maxmemory", MAXMEMORY)


def test_final_write_refused_by_full_redis_is_retried_and_heartbeat_survives(
    small_redis: RedisServer, checkpoint: Path, tmp_path: Path
) -> None:
    url = small_redis.url
    r, store, w = _store_and_worker(url, checkpoint, tmp_path)
    try:
        name = wait_worker_ready(url, w)
        job_id, _ = store.create_job(GenerationParams(prompt="a red square", num_images=4,
                                                      seed=1), test_hooks={"row_delay": 0.3})
        wait_for(lambda: store.get(job_id).status == "running", 30, "the job")
        fillers = fill(r)
        # The job ends sampling (8 rows x 0.3 s) while Redis stays full.
        deadline = time.monotonic() + 8 * 0.3 + FULL_FOR_S
        while time.monotonic() < deadline:
            assert r.exists(Keys.worker(name)), "the heartbeat key expired while Redis was full"
            job = store.get(job_id)
            assert job.status == "running" and job.attempt == 1
            assert w.alive()
            time.sleep(0.2)
        assert "final write (succeeded, 4 image(s)) refused: Redis is full" in w.log()
        _make_room(r, fillers)

        wait_for(lambda: store.get(job_id).status == "succeeded", 30,
                 "the job to be recorded once Redis has room")
        job = store.get(job_id)
        assert job.attempt == 1 and job.images == 4
        pngs = [store.get_blob(Keys.image(job_id, k)) or b"" for k in range(4)]
        assert all(p.startswith(b"\x89PNG") for p in pngs)
        info = json.loads(r.get(Keys.worker(name)))
        metrics = httpx.get(f"http://127.0.0.1:{info['metrics_port']}/metrics").text
        retries = next(float(x.split()[-1]) for x in metrics.splitlines()
                       if x.startswith('promptpix_final_write_retries_total{reason="full"}'))
        assert retries >= 1

        # The worker still serves.
        nxt, _ = store.create_job(GenerationParams(prompt="a blue square", seed=2))
        wait_for(lambda: store.get(nxt).status == "succeeded", 30, "next job")
        assert w.alive()
        _record_sizes(r, job_id, 4)
    finally:
        w.stop()


def _record_sizes(r: redis.Redis, job_id: str, n_images: int) -> None:
    """Print what one finished job costs in Redis (MEMORY USAGE, bytes) for the docs."""
    job = r.memory_usage(Keys.job(job_id)) or 0
    images = [r.memory_usage(Keys.image(job_id, k)) or 0 for k in range(n_images)]
    preview = r.memory_usage(Keys.preview(job_id)) or 0
    rq = r.memory_usage(f"rq:job:{rq_job_id(job_id, 1)}") or 0
    print(f"\nbytes in Redis: job hash {job}, images {images}, preview {preview}, "
          f"RQ job {rq}")


@pytest.mark.slow
def test_final_write_refused_past_its_retries_is_handed_on_not_failed_model_error(
    small_redis: RedisServer, checkpoint: Path, tmp_path: Path
) -> None:
    # Redis stays full past the final write's whole retry window (FINAL_WRITE_RETRY_S):
    # the images are lost, but the model did nothing wrong. The job is left `running` for
    # the reaper, which hands it on (attempt 2) once Redis has room: it must not end
    # `failed` with `model_error` (a second write, of that error, once room came back).
    from worker.jobs import FINAL_WRITE_RETRY_S

    url = small_redis.url
    r, store, w = _store_and_worker(url, checkpoint, tmp_path)
    try:
        wait_worker_ready(url, w)
        job_id, _ = store.create_job(GenerationParams(prompt="a red square", seed=1),
                                     test_hooks={"row_delay": 0.3})
        wait_for(lambda: store.get(job_id).status == "running", 30, "the job")
        fillers = fill(r)
        wait_for(lambda: "giving up" in w.log(), FINAL_WRITE_RETRY_S + 30,
                 "the final write to give up")
        _make_room(r, fillers)
        wait_for(lambda: store.get(job_id).status.finished, 60, "the job to end")
        job = store.get(job_id)
        assert job.error_code != "model_error", job.error_message
        assert job.status == "succeeded" and job.attempt == 2 and job.images == 1
        assert w.alive()
    finally:
        w.stop()
