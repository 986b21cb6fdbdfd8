"""kill -9 of workers in the middle of jobs, repeated, with random kill times.

The reduced version (one kill, then SIGTERM) is tests/e2e/test_serving_faults.py's
`test_kill9_and_sigterm_mid_job`; this is the long one: 20 jobs across 2 workers, a
worker killed at a random moment of a running job again and again (each replaced at
once). No job may be lost: each ends `succeeded`, or `failed` with `worker_lost` once its
retries are used; every kill is noticed (job back to `queued`, or `failed`) within 60 s.
The detection delays go to docs/reliability.md.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import httpx
import pytest
import redis

from app.redis_server import RedisServer, free_port
from tests.worker.helpers import (
    FAST_LIVENESS,
    Proc,
    finished,
    live_worker_names,
    poll_job,
    start_api,
    start_worker,
    wait_for,
    wait_worker_ready,
)
from worker.protocol import GenerationParams, JobStore, Settings

DETECT_LIMIT_S = 60.0


def _kill_rounds(tmp: Path, checkpoint: Path, jobs: int, kills: int, liveness: dict[str, str],
                 row_delay: float = 0.4, seed: int = 0) -> dict:
    rng = random.Random(seed)
    rs = RedisServer().start()
    port = free_port()
    api = start_api(rs.url, port, tmp / "api.log", PROMPTPIX_RATE_LIMIT="0", **liveness)
    store = JobStore(redis.Redis.from_url(rs.url), Settings(redis_url=rs.url))
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    procs: dict[int, Proc] = {}  # pid -> worker process (replacements start unwaited)
    n_started = 0

    def spawn() -> Proc:
        nonlocal n_started
        n_started += 1
        p = start_worker(rs.url, checkpoint, tmp / f"w{n_started}.log", **liveness)
        procs[p.proc.pid] = p
        return p

    delays: list[float] = []
    try:
        wait_worker_ready(rs.url, spawn())
        wait_worker_ready(rs.url, spawn(), before=live_worker_names(rs.url))
        ids = []
        for k in range(jobs):
            # Slow rows (a test hook): each job takes ~3 s, so kills land inside jobs.
            job_id, _ = store.create_job(GenerationParams(prompt="a red square", seed=k),
                                         test_hooks={"row_delay": row_delay})
            ids.append(job_id)
        for _ in range(kills):
            def running() -> tuple[str, Proc, int] | str | None:
                live = {w["name"]: w for w in store.live_workers()}
                pending = 0
                for job_id in ids:
                    job = store.get(job_id)
                    if job is not None and job.status in ("queued", "running"):
                        pending += 1
                    w = live.get(job.worker)
                    if job.status == "running" and w and w["pid"] in procs \
                            and procs[w["pid"]].alive():
                        return job_id, procs[w["pid"]], job.attempt
                return None if pending else "all done"

            found = wait_for(running, 60, "a worker on a job")
            if found == "all done":
                break
            job_id, victim, attempt = found
            time.sleep(rng.uniform(0.0, row_delay * 6))  # a random moment of the job
            victim.kill9()
            t_kill = time.monotonic()

            def noticed(job_id: str = job_id, attempt: int = attempt) -> bool:
                job = store.get(job_id)
                return job is None or job.status != "running" or job.attempt != attempt

            wait_for(noticed, DETECT_LIMIT_S, f"the kill of {job_id}'s worker to be noticed",
                     every=0.02)
            delays.append(time.monotonic() - t_kill)
            spawn()  # not waited for: the other worker keeps serving meanwhile
        outcomes: dict[str, int] = {}
        for job_id in ids:
            job = poll_job(http, job_id, finished, timeout=120)
            assert job["status"] == "succeeded" or (
                job["status"] == "failed" and job["error"]["code"] == "worker_lost"), job
            outcomes[job["status"]] = outcomes.get(job["status"], 0) + 1
        assert sum(outcomes.values()) == jobs  # nothing lost
        assert delays and max(delays) < DETECT_LIMIT_S
        return {"jobs": jobs, "kills": len(delays), "outcomes": outcomes,
                "delay_min_s": round(min(delays), 2),
                "delay_median_s": round(statistics.median(delays), 2),
                "delay_max_s": round(max(delays), 2)}
    finally:
        for p in procs.values():
            p.stop()
        http.close()
        api.stop()
        rs.cleanup()


@pytest.mark.slow
def test_twenty_jobs_two_workers_random_kills(tmp_path: Path, tiny_checkpoint: Path) -> None:
    figures = _kill_rounds(tmp_path, tiny_checkpoint, jobs=20, kills=10,
                           liveness=FAST_LIVENESS)
    print("\nworker kill figures (heartbeat 0.5 s, reaper 0.5 s):", figures)


@pytest.mark.slow
def test_kill_detection_with_production_liveness(tmp_path: Path,
                                                 tiny_checkpoint: Path) -> None:
    """The defaults (heartbeat 5 s, key TTL 15 s, reaper every 5 s): noticed within ~20 s."""
    figures = _kill_rounds(tmp_path, tiny_checkpoint, jobs=4, kills=2,
                           liveness={"PROMPTPIX_HEARTBEAT_INTERVAL": "5",
                                     "PROMPTPIX_REAPER_INTERVAL": "5"})
    assert figures["delay_max_s"] <= 25, figures
    print("\nworker kill figures (production liveness):", figures)
