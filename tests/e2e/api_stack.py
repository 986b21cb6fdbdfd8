"""One real stack (Redis, API with keys on, a worker) shared by the OpenAI and events tests."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import redis

from app.redis_server import RedisServer, free_port
from tests.worker.helpers import (
    Proc,
    start_api,
    start_worker,
    wait_worker_ready,
)
from worker.protocol import GenerationParams, JobStore, Keys, Settings

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Stack:
    """Redis, an API with keys on and an alias, one worker batching up to 2 images."""

    def __init__(self, tmp: Path, checkpoint: Path) -> None:
        self.tmp = tmp
        self.redis = RedisServer().start()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api = start_api(self.redis.url, self.port, tmp / "api.log",
                             PROMPTPIX_API_KEYS=KEY, PROMPTPIX_URL_TTL="60",
                             PROMPTPIX_RATE_LIMIT="0",
                             PROMPTPIX_MODEL_ALIASES="dall-e-3=tiny16")
        self.worker: Proc = start_worker(self.redis.url, checkpoint, tmp / "worker.log",
                                         PROMPTPIX_MAX_BATCH="2")
        wait_worker_ready(self.redis.url, self.worker)
        self.http = httpx.Client(base_url=self.base, timeout=30, headers=AUTH)
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key=KEY, timeout=60)
        self.store = JobStore(redis.Redis.from_url(self.redis.url),
                              Settings(redis_url=self.redis.url))

    def close(self) -> None:
        self.client.close()
        self.http.close()
        self.worker.stop()
        self.api.stop()
        self.redis.cleanup()

    def owner(self) -> str:
        from app.deps import key_owner

        return key_owner(KEY)

    def slow_job(self, row_delay: float) -> str:
        """A job of this key that takes `row_delay` s a row (test hooks: store only)."""
        p = GenerationParams(prompt="a red square", seed=1)
        job_id, _ = self.store.create_job(p, owner=self.owner(),
                                          test_hooks={"row_delay": row_delay})
        return job_id

    def job_ids(self) -> set[str]:
        return {k.decode().split(":")[2] for k in self.store.r.scan_iter(Keys.job("*"))
                if k.decode().count(":") == 2}

    def job(self, job_id: str) -> dict:
        r = self.http.get(f"/v1/generations/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()
