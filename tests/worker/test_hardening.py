"""Issue 14, worker side: what a worker runs from Redis, and how every job ends.

Real Redis, real `promptpix worker` processes, real RQ entries written into the queue.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from PIL import Image
from rq import Callback, Queue
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from tests.worker.helpers import (
    Proc,
    make_tiny_checkpoint,
    start_worker,
    wait_for,
    wait_worker_ready,
)
from worker.protocol import (
    GenerationParams,
    JobRecord,
    JobStore,
    Keys,
    ScoreParams,
    Settings,
    queue_name,
)

ZEN = "Beautiful is better than ugly"  # what `import this` prints
MODEL = "tiny_serving"  # the checkpoint's file stem: its worker serves `generate:tiny_serving`


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.getbasetemp() / f"{MODEL}.pth")


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url), Settings(redis_url=redis_url), model=MODEL)


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


def _job(store: JobStore, job_id: str) -> JobRecord:
    job = store.get(job_id)
    assert job is not None, f"job {job_id} vanished"
    return job


def _ended(store: JobStore, *ids: str) -> bool:
    return all(_job(store, j).status.finished for j in ids)


def _unchecked(**fields: Any) -> GenerationParams:
    """Parameters that skip validation: what a hostile writer could put into Redis."""
    return GenerationParams.model_construct(**{"prompt": "a red square", "num_images": 1,
                                                "seed": 1, **fields})


def _metric(proc_info: dict[str, Any], line_start: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{proc_info['metrics_port']}/metrics").text
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return 0.0


def _info(store: JobStore, name: str) -> dict[str, Any]:
    return json.loads(store.r.get(Keys.worker(name)))


# ---------------------------------------------------------------------------- item 1
def test_queue_entries_naming_other_code_are_refused_without_import(
    redis_url: str, store: JobStore, checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    target = tmp_path / "made-by-redis"
    r = redis.Redis.from_url(redis_url)
    q = Queue(queue_name(MODEL), connection=r, serializer=JSONSerializer)
    # An abandoned entry in RQ's started registry: RQ's maintenance (run as a worker starts)
    # would call its failure callback.
    abandoned = q.enqueue_call("worker.jobs.generate", args=({},),
                               on_failure=Callback("this.s"))
    r.lrem(q.key, 0, abandoned.id)
    r.hset(abandoned.key, "status", "started")
    r.zadd(q.started_job_registry.key, {f"{abandoned.id}:x": 1})
    w = _worker(redis_url, checkpoint, tmp_path / "w.log", procs)
    hostile = [
        q.enqueue_call("os.mkdir", args=(str(target),)),
        q.enqueue_call("this.s"),  # importing `this` prints the Zen of Python
        # The right function, with hooks that name other code.
        q.enqueue_call("worker.jobs.generate", args=({"job_id": "0" * 32},),
                       on_success=Callback("os.mkdir"), on_failure=Callback("this.s")),
        q.enqueue_call("worker.jobs.generate", args=({},), depends_on=None,
                       meta={"x": 1}),
    ]
    # The score kind is served (issue 16): a malformed score payload runs its allowlisted
    # function, which refuses the payload (failed, not "refused").
    bad_score = q.enqueue_call("worker.jobs.score", args=({},))
    # A job of ours whose queue entry was rewritten to name other code: it ends failed.
    victim, _ = store.create_job(GenerationParams(prompt="a red square", seed=3))
    rq_key = f"rq:job:{victim}-a1"
    r.hset(rq_key, "data", json.dumps(["os.mkdir", None, [str(target)], {}]))
    ok, _ = store.create_job(GenerationParams(prompt="a blue square", seed=4))
    wait_for(lambda: _ended(store, ok), 60, "the job behind the hostile entries")
    assert not target.exists()
    assert ZEN not in w.log()
    assert _job(store, ok).status == "succeeded"  # the worker carried on serving
    wait_for(lambda: _ended(store, victim), 10, "the job whose entry was rewritten")
    victim_job = _job(store, victim)
    assert victim_job.status == "failed"
    assert victim_job.error_code == "invalid_payload"
    assert "os.mkdir" in victim_job.error_message
    failed = set(FailedJobRegistry(queue_name(MODEL), connection=r).get_job_ids())
    assert {j.id for j in hostile} | {f"{victim}-a1", bad_score.id} <= failed
    log = w.log()
    for j in hostile:
        assert f"refused queue entry {j.id}" in log
    assert "carries on_success callback, on_failure callback" in log
    assert f"refused queue entry {bad_score.id}" not in log
    assert w.alive()


# ---------------------------------------------------------------------------- item 12
def test_unparseable_payload_ends_failed_invalid_payload(
    redis_url: str, store: JobStore, checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    bad, _ = store.create_job(_unchecked(top_k=1180591620717411303424))
    good, _ = store.create_job(GenerationParams(prompt="a red square", seed=1))
    _worker(redis_url, checkpoint, tmp_path / "w.log", procs)
    wait_for(lambda: _ended(store, bad, good), 60, "both jobs to end")
    job = _job(store, bad)
    assert job.status == "failed" and job.error_code == "invalid_payload"
    assert "top_k" in job.error_message
    assert job.finished_at
    assert _job(store, good).status == "succeeded"


# ---------------------------------------------------------------------------- item 9
def test_bad_job_fails_alone_and_its_batch_mates_succeed(
    redis_url: str, store: JobStore, checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    good = [GenerationParams(prompt="a red square", seed=s) for s in (1, 2, 3)]
    ids = [store.create_job(good[0])[0],
           store.create_job(_unchecked(top_k=1180591620717411303424, seed=9))[0],
           store.create_job(good[1])[0],
           store.create_job(_unchecked(class_label=3, seed=8))[0],  # the model has no classes
           store.create_job(good[2])[0]]
    w = _worker(redis_url, checkpoint, tmp_path / "w.log", procs, PROMPTPIX_MAX_BATCH="4")
    wait_for(lambda: _ended(store, *ids), 60, "all five jobs")
    g0, bad_payload, g1, bad_request, g2 = (_job(store, j) for j in ids)
    assert [g.status for g in (g0, g1, g2)] == ["succeeded"] * 3
    assert bad_payload.status == "failed"
    assert bad_payload.error_code == "invalid_payload"
    assert bad_request.status == "failed"
    assert bad_request.error_code == "invalid_request"
    assert "class_label 3" in bad_request.error_message
    assert f"batch of 3 jobs (3 images): {ids[0]} {ids[2]} {ids[4]}" in w.log()


# ---------------------------------------------------------------------------- item 13
def test_timeout_while_encoding_pngs_ends_timeout_and_is_not_retried(
    redis_url: str, store: JobStore, checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    _worker(redis_url, checkpoint, tmp_path / "w.log", procs, PROMPTPIX_JOB_TIMEOUT="2")
    slow, _ = store.create_job(GenerationParams(prompt="a red square", seed=1),
                               test_hooks={"encode_delay": 6.0})
    wait_for(lambda: _ended(store, slow), 30, "the slow job")
    time.sleep(2.0)  # several reaper sweeps (0.5 s): nothing may hand the job on
    job = _job(store, slow)
    assert job.status == "failed" and job.error_code == "timeout"
    assert job.attempt == 1 and job.retries == 0


# ---------------------------------------------------------------------------- item 14
def test_attempt_handed_on_is_not_counted_canceled(
    redis_url: str, store: JobStore, checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    w = _worker(redis_url, checkpoint, tmp_path / "w.log", procs)
    name = wait_for(lambda: next(iter(json.loads(v)["name"] for v in [
        store.r.get(k) for k in store.r.keys(Keys.worker("*"))] if v), None), 10, "name")
    slow, _ = store.create_job(GenerationParams(prompt="a red square", seed=1),
                               test_hooks={"row_delay": 0.3})
    wait_for(lambda: _job(store, slow).progress > 0, 30, "the job to run")
    # What the reaper does to a job whose worker it believes lost: attempt 2 is queued.
    assert store.requeue(slow, 1, name, lost=True) == "requeued"
    wait_for(lambda: _ended(store, slow), 60, "attempt 2")
    assert _job(store, slow).status == "succeeded" and _job(store, slow).attempt == 2
    info = _info(store, name)
    assert _metric(info, 'promptpix_jobs_completed_total{status="canceled"}') == 0
    assert _metric(info, 'promptpix_jobs_completed_total{status="succeeded"}') == 1
    assert _metric(info, "promptpix_attempts_handed_on_total") == 1
    assert f"job {slow} attempt 1 stopped" in w.log()


def test_score_canceled_while_running_is_counted_canceled(
    redis_url: str, store: JobStore, checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    # A score job ends like a generation: canceled mid-run, its attempt's end is counted
    # `canceled` (jobs_completed_total), as a generation's is.
    w = _worker(redis_url, checkpoint, tmp_path / "w.log", procs)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (220, 40, 40)).save(buf, format="PNG")
    score, _ = store.create_job(ScoreParams(captions=["a red square"]), upload=buf.getvalue(),
                                test_hooks={"score_delay": 1.0})
    wait_for(lambda: _job(store, score).status == "running", 30, "the score to run")
    assert store.cancel(score) == "ok"
    wait_for(lambda: f"score job {score} attempt 1 finished but was no longer ours" in w.log(),
             30, "the score's attempt to end")
    info = store.live_workers()[0]
    assert _metric(info, 'promptpix_jobs_completed_total{status="canceled"}') == 1
    assert _metric(info, 'promptpix_jobs_completed_total{status="succeeded"}') == 0
