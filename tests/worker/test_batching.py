"""Batching across jobs (PROMPTPIX_MAX_BATCH) with a real Redis and a real worker process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.worker.helpers import (
    Proc,
    make_tiny_checkpoint,
    start_worker,
    wait_for,
    wait_worker_ready,
)
from worker.protocol import GenerationParams, JobStore, Keys, Settings

# Different parameters per job on purpose: the batched sampler keeps each job's own.
JOBS = [
    dict(prompt="a red square", num_images=2, seed=5, temperature=0.9),
    dict(prompt="a blue square", num_images=3, seed=77, guidance_scale=2.0, top_k=5),
    dict(prompt="a green square", num_images=1, seed=1234, top_p=0.8, temperature=1.3),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.getbasetemp() / "tiny_serving.pth")


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url), Settings(redis_url=redis_url),
                    model="tiny_serving")  # its jobs go to that model's queue


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def _worker(redis_url: str, checkpoint: Path, log: Path, procs: list[Proc], **env: str) -> Proc:
    w = start_worker(redis_url, checkpoint, log, **env)
    procs.append(w)
    wait_worker_ready(redis_url, w)
    return w


def _done(store: JobStore, ids: list[str]) -> bool:
    return all(store.get(j).status.finished for j in ids)


def _pngs(store: JobStore, job_id: str) -> list[bytes]:
    n = store.get(job_id).images
    return [store.get_blob(Keys.image(job_id, k)) or b"" for k in range(n)]


def test_queued_jobs_share_one_batch_and_match_solo_runs(
    redis_url: str, store: JobStore, checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    # Queued before any worker exists, so the worker finds all three waiting.
    ids = [store.create_job(GenerationParams(**j))[0] for j in JOBS]  # type: ignore[arg-type]
    w = _worker(redis_url, checkpoint, tmp_path / "batched.log", procs,
                PROMPTPIX_MAX_BATCH="8")
    wait_for(lambda: _done(store, ids), 60, "the batched jobs")
    batched = {j: _pngs(store, j) for j in ids}
    assert [len(batched[j]) for j in ids] == [j["num_images"] for j in JOBS]
    assert all(store.get(j).status == "succeeded" for j in ids)
    assert f"batch of 3 jobs (6 images): {' '.join(ids)}" in w.log()
    assert store.queue_depth() == 0  # the mates' queue entries went with them
    w.stop()

    # The same jobs again, one at a time (the default): byte-identical PNGs. (Rows of a
    # batch could in principle differ in the last floating-point bits from a run alone,
    # which API.md allows; with this model on CPU they do not, and that is checked here.)
    solo = _worker(redis_url, checkpoint, tmp_path / "solo.log", procs)
    ids2 = [store.create_job(GenerationParams(**j))[0] for j in JOBS]  # type: ignore[arg-type]
    wait_for(lambda: _done(store, ids2), 60, "the solo jobs")
    assert "batch of" not in solo.log()
    for a, b in zip(ids, ids2, strict=True):
        assert _pngs(store, b) == batched[a]


def test_cancel_one_job_of_a_batch(
    redis_url: str, store: JobStore, checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    slow = store.create_job(GenerationParams(prompt="a red square", num_images=2, seed=1),
                            test_hooks={"row_delay": 0.3})[0]
    other = store.create_job(GenerationParams(prompt="a blue square", num_images=3, seed=2))[0]
    w = _worker(redis_url, checkpoint, tmp_path / "cancel.log", procs, PROMPTPIX_MAX_BATCH="8")
    wait_for(lambda: store.get(slow).progress > 0, 30,
             "the batch to start")
    assert store.get(other).status == "running"
    assert store.cancel(slow) == "ok"
    wait_for(lambda: _done(store, [slow, other]), 30, "the other job")
    assert store.get(slow).status == "canceled"
    assert store.get(other).status == "succeeded" and len(_pngs(store, other)) == 3
    assert "batch of 2 jobs (5 images)" in w.log()
    assert f"job {slow} attempt 1 stopped" in w.log()


def test_sigterm_mid_batch_requeues_its_jobs_in_queue_order(
    redis_url: str, store: JobStore, checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    # Three jobs batched together, then a SIGTERM whose grace runs out mid-batch: all
    # three go back to the front of the queue, still in the order they were submitted
    # (each requeued `at_front` in batch order would reverse them: the last job first).
    ids = [store.create_job(GenerationParams(prompt="a red square", seed=s),
                            test_hooks={"row_delay": 0.2})[0] for s in (1, 2, 3)]
    later = store.create_job(GenerationParams(prompt="a blue square", seed=4))[0]
    w = _worker(redis_url, checkpoint, tmp_path / "w.log", procs, PROMPTPIX_MAX_BATCH="3",
                PROMPTPIX_SHUTDOWN_GRACE="0.3")
    wait_for(lambda: store.get(ids[0]).progress > 0, 30, "the batch to start")
    assert w.stop(timeout=20) == 0, w.log()[-2000:]
    assert f"batch of 3 jobs (3 images): {' '.join(ids)}" in w.log()
    assert [store.get(j).status for j in ids] == ["queued"] * 3
    assert [j for j, _, _ in store.queued_head(10)] == [*ids, later]
