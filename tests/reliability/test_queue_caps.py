"""Issue 14 items 10 and 11: fair share of the queue and idempotent retries at the caps.

The caps are checked in the same Redis step as the insert (`scripts.ADMIT`), so concurrent
submissions cannot overshoot them. Real uvicorn, real Redis, no worker (jobs stay queued).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

from app.redis_server import free_port
from tests.worker.helpers import start_api
from worker.protocol import GenerationParams, JobStore, QueueFull, Settings

KEY_A = "a" * 32
KEY_B = "b" * 32
BODY = {"prompt": "a red square", "seed": 1}


def _post(base: str, key: str, idem: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if idem:
        headers["Idempotency-Key"] = idem
    return httpx.post(f"{base}/v1/generations", json=BODY, headers=headers, timeout=30)


def test_per_key_cap_holds_under_60_concurrent_posts(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    api = start_api(redis_url, port, tmp_path / "api.log", PROMPTPIX_RATE_LIMIT="0",
                    PROMPTPIX_API_KEYS=f"{KEY_A},{KEY_B}", PROMPTPIX_MAX_QUEUED_PER_KEY="10")
    base = f"http://127.0.0.1:{port}"
    try:
        gate = threading.Barrier(60)

        def one(_: int) -> httpx.Response:
            gate.wait()
            return _post(base, KEY_A)

        with ThreadPoolExecutor(60) as pool:
            answers = list(pool.map(one, range(60)))
        codes = [r.status_code for r in answers]
        assert codes.count(202) == 10, codes
        refused = [r for r in answers if r.status_code != 202]
        assert len(refused) == 50
        assert all(r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
                   and int(r.headers["retry-after"]) > 0 for r in refused)

        # Another key still gets in; a retry of an accepted job gets that job even at the cap.
        first = _post(base, KEY_B, idem="retry-me")
        assert first.status_code == 202
        for _ in range(9):
            assert _post(base, KEY_B).status_code == 202
        assert _post(base, KEY_B).json()["error"]["code"] == "quota_exceeded"
        again = _post(base, KEY_B, idem="retry-me")
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    finally:
        api.stop()


def test_retry_of_accepted_job_is_answered_when_the_queue_is_full(
    redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    api = start_api(redis_url, port, tmp_path / "api.log", PROMPTPIX_RATE_LIMIT="0",
                    PROMPTPIX_API_KEYS=f"{KEY_A},{KEY_B}", PROMPTPIX_MAX_QUEUE="2")
    base = f"http://127.0.0.1:{port}"
    try:
        first = _post(base, KEY_A, idem="k")
        assert _post(base, KEY_B).status_code == 202
        full = _post(base, KEY_B)
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        again = _post(base, KEY_A, idem="k")
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    finally:
        api.stop()


def test_global_cap_is_atomic_under_concurrent_submissions(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, max_queue=5)
    store = JobStore(redis.Redis.from_url(redis_url), settings)
    gate = threading.Barrier(20)

    def one(i: int) -> bool:
        gate.wait()
        try:
            store.create_job(GenerationParams(prompt="a red square", seed=i))
            return True
        except QueueFull:
            return False

    with ThreadPoolExecutor(20) as pool:
        created = list(pool.map(one, range(20)))
    assert created.count(True) == 5
    assert store.queue_depth() == 5
