"""Redis killed (SIGKILL) and restarted under a stream of submissions.

While Redis is down the API answers 503 `unavailable` with Retry-After and nothing else;
it recovers by itself; the same worker process (no restart) serves jobs afterwards. With
persistence on (append-only file), every job the API accepted (202) finishes. With it off,
jobs accepted before the restart are gone (404) — what docs/reliability.md says plainly.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.redis_server import RedisServer, free_port
from tests.worker.helpers import (
    finished,
    poll_job,
    start_api,
    start_worker,
    wait_for,
    wait_worker_ready,
)


@dataclass
class Submitter:
    """Posts a job every `every` seconds over real HTTP and records each answer."""

    http: httpx.Client
    every: float = 0.15
    accepted: list[tuple[float, str]] = field(default_factory=list)
    answers: list[tuple[float, int, str | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            t = time.monotonic()
            try:
                r = self.http.post("/v1/generations",
                                   json={"prompt": "a red square", "seed": n})
            except httpx.HTTPError as e:  # the API itself must never drop a connection
                self.answers.append((t, -1, repr(e)))
                continue
            self.answers.append((t, r.status_code, r.headers.get("retry-after")))
            if r.status_code == 202:
                self.accepted.append((t, r.json()["id"]))
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()


def _restarts(tmp: Path, checkpoint: Path, persist: bool, outages: list[float]) -> dict:
    rs = RedisServer(persist=persist).start()
    port = free_port()
    # Rate limit and per-caller cap off: the submitter outpaces the worker on purpose (a
    # backlog across the outages), and this test is about restarts, not quotas.
    api = start_api(rs.url, port, tmp / "api.log", PROMPTPIX_RATE_LIMIT="0",
                    PROMPTPIX_MAX_QUEUED_PER_KEY="0")
    worker = start_worker(rs.url, checkpoint, tmp / "worker.log")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    sub = Submitter(http)
    thread = threading.Thread(target=sub.run, daemon=True)
    figures: dict = {"outages": [], "persist": persist}
    try:
        wait_worker_ready(rs.url, worker)
        pid = worker.proc.pid
        thread.start()
        for outage in outages:
            wait_for(lambda: len(sub.accepted) >= 5, 30, "a few accepted jobs")
            before = len(sub.accepted)
            last_before = sub.accepted[-1][1]
            rs.stop()  # SIGKILL: no shutdown save beyond what the append-only file holds
            down_at = time.monotonic()
            time.sleep(outage)
            rs.start()
            up_at = time.monotonic()
            # The API answers 202 again by itself.
            first_ok = wait_for(lambda up_at=up_at: next(
                (t for t, _ in sub.accepted if t > up_at), None),
                                30, "a 202 after Redis came back")
            # A job accepted after the restart runs on the same worker process.
            new_job = next(j for t, j in sub.accepted if t > up_at)
            done = poll_job(http, new_job, finished, timeout=60)
            assert done["status"] == "succeeded", done
            assert worker.alive() and worker.proc.pid == pid
            ran_at = time.monotonic()
            down = [a for a in sub.answers if down_at + 0.2 < a[0] < up_at - 0.2]
            assert down, "no submission was made while Redis was down"
            for _, status, retry_after in down:
                assert status == 503 and retry_after and int(retry_after) > 0, (status,
                                                                                 retry_after)
            old = http.get(f"/v1/generations/{last_before}")
            figures["outages"].append({
                "outage_s": outage, "answers_while_down": len(down),
                "api_recovery_s": round(first_ok - up_at, 2),
                "first_job_done_after_restart_s": round(ran_at - up_at, 2),
                "accepted_before": before,
                "last_job_before_restart": old.status_code,
            })
            if not persist:
                assert old.status_code == 404  # forgotten: what the docs say
        sub.stop()
        thread.join(15)
        statuses = {s for _, s, _ in sub.answers}
        assert statuses <= {202, 503}, statuses
        # Every accepted job ends (persistence on), or was forgotten by a restart (off).
        restart_times = [a for a in sub.answers if a[1] == 503]
        last_503 = max(t for t, _, _ in restart_times)
        lost, results = [], {}
        for t, job_id in sub.accepted:
            r = http.get(f"/v1/generations/{job_id}")
            if r.status_code == 404:
                lost.append(job_id)
                assert not persist, f"accepted job {job_id} vanished with persistence on"
                assert t < last_503, "a job accepted after the last restart vanished"
                continue
            job = poll_job(http, job_id, finished, timeout=120)
            results[job["status"]] = results.get(job["status"], 0) + 1
        assert set(results) <= {"succeeded"}, results
        figures.update(accepted=len(sub.accepted), lost=len(lost), results=results,
                       answers={s: sum(1 for a in sub.answers if a[1] == s) for s in statuses})
        assert worker.alive() and worker.proc.pid == pid, "the worker was restarted"
        return figures
    finally:
        sub.stop()
        http.close()
        worker.stop()
        api.stop()
        rs.cleanup()


def test_redis_restart_with_persistence(tmp_path: Path, tiny_checkpoint: Path) -> None:
    figures = _restarts(tmp_path, tiny_checkpoint, persist=True, outages=[2.0])
    assert figures["lost"] == 0
    print("\nredis restart figures:", figures)


@pytest.mark.slow
@pytest.mark.parametrize("persist", [True, False])
def test_redis_restarts_repeated(tmp_path: Path, tiny_checkpoint: Path, persist: bool) -> None:
    figures = _restarts(tmp_path, tiny_checkpoint, persist=persist, outages=[1.0, 5.0, 12.0])
    if persist:
        assert figures["lost"] == 0
    print(f"\nredis restart figures (persist={persist}):", figures)


def test_entry_taken_but_never_claimed_is_requeued(redis_url: str) -> None:
    """Found by the slow restart test: Redis died between RQ's dequeue and our claim, and
    the job stayed `queued` with no queue entry (it would never run). The reaper now gives
    such a job a fresh attempt at the front of the queue."""
    import redis

    from worker.protocol import GenerationParams, JobStore, Settings, rq_job_id

    settings = Settings(redis_url=redis_url, heartbeat_interval=0.1, reaper_interval=0.1)
    store = JobStore(redis.Redis.from_url(redis_url), settings, model="m1")
    job_id, _ = store.create_job(GenerationParams(prompt="a red square", seed=1))
    # What a worker's dequeue does before it dies: the entry moves off the queue.
    store.r.lmove(store.queue.key, store.queue.intermediate_queue_key)
    assert store.queue_depth() == 0
    assert store.reap_orphans() == []  # first sight: within the grace period
    time.sleep(0.35)
    assert [j for j, _ in store.reap_orphans()] == [job_id]
    job = store.get(job_id)
    assert job.status == "queued" and job.attempt == 2 and job.retries == 0
    assert store.queue_position(job) == 0
    assert store.r.llen(store.queue.intermediate_queue_key) == 0
    assert store.reap_orphans() == []
    # A claim of the old entry is fenced.
    assert store.claim(job_id, rq_job_id(job_id, 1), "w", {}) == "stale"
