"""Webhooks end to end (issue 17 phase B): a real API, worker and `promptpix webhooks`
deliver signed events to a real receiver on 127.0.0.1, which fails once and sees the
retry carry the same webhook-id; progress events come at most once a second."""

from __future__ import annotations

import base64
import itertools
import json
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from app.redis_server import RedisServer, free_port
from tests.worker.helpers import (
    Proc,
    base_env,
    finished,
    make_tiny_checkpoint,
    poll_job,
    start_api,
    start_worker,
    wait_for,
    wait_worker_ready,
)

SECRET = "whsec_" + base64.b64encode(b"promptpix-test-webhook-secret!!").decode()
LOOPBACK = {"PROMPTPIX_WEBHOOK_SECRET": SECRET, "PROMPTPIX_WEBHOOK_ALLOW": "127.0.0.0/8"}


class Receiver:
    """An HTTP server on 127.0.0.1 recording every delivery; answers 500 to the first."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with outer.lock:
                    first = not outer.seen
                    outer.seen.append({"headers": dict(self.headers.items()),
                                       "body": body.decode(), "answered": 500 if first else 204})
                self.send_response(500 if first else 204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, job_id: str) -> list[dict[str, Any]]:
        with self.lock:
            out = []
            for d in self.seen:
                body = json.loads(d["body"])
                if body["data"]["id"] == job_id:
                    out.append({**d, "json": body})
            return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.getbasetemp() / "tiny_serving.pth")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def test_signed_deliveries_retried_after_a_failure(checkpoint: Path, tmp_path: Path,
                                                   receiver: Receiver) -> None:
    rs = RedisServer().start()
    port = free_port()
    procs: list[Proc] = []
    try:
        procs.append(start_api(rs.url, port, tmp_path / "api.log", PROMPTPIX_RATE_LIMIT="0",
                               **LOOPBACK))
        worker = start_worker(rs.url, checkpoint, tmp_path / "worker.log")
        procs.append(worker)
        procs.append(Proc([sys.executable, "-m", "promptpix_cli", "webhooks"],
                          base_env(rs.url, PROMPTPIX_WEBHOOK_BACKOFF_SCALE="0.1", **LOOPBACK),
                          tmp_path / "webhooks.log"))
        wait_worker_ready(rs.url, worker)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        r = http.post("/v1/generations", json={
            "prompt": "a red square", "seed": 1, "webhook": receiver.url,
            "webhook_events_filter": ["start", "completed"]})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert poll_job(http, job_id, finished)["status"] == "succeeded"
        got = wait_for(lambda: (e := receiver.events(job_id)) and len(e) >= 3 and e, 30,
                       "start (failed, then retried) and completed")
        signer = Webhook(SECRET)
        for d in got:  # every delivery verifies with the shared secret
            assert signer.verify(d["body"], d["headers"])["data"]["id"] == job_id
        # A retry is not held back for later events: order by kind, not arrival.
        starts = [d for d in got if d["json"]["type"] == "generation.start"]
        (done,) = [d for d in got if d["json"]["type"] == "generation.completed"]
        assert len(got) == 3 and len(starts) == 2
        assert [d["answered"] for d in starts] == [500, 204]
        # The retry is the same message (same id), signed again.
        assert starts[0]["headers"]["webhook-id"] == starts[1]["headers"]["webhook-id"]
        assert done["headers"]["webhook-id"] != starts[0]["headers"]["webhook-id"]
        assert done["json"]["data"]["status"] == "succeeded"
        assert done["json"]["data"]["images"]
        view = wait_for(lambda: (v := http.get(f"/v1/generations/{job_id}").json())
                        ["webhook"]["attempts"] >= 3 and v, 10, "the delivery record")
        assert view["webhook"] == {"delivered": True, "attempts": 3, "last_status": 204}

        # Progress: at most one event a second while the rows are sampled.
        store_job = _slow_job(rs.url, receiver.url)
        assert poll_job(http, store_job, finished, timeout=90)["status"] == "succeeded"
        events = wait_for(lambda: (e := receiver.events(store_job)) and any(
            d["json"]["type"] == "generation.completed" for d in e) and e, 30, "completed")
        times = [datetime.fromisoformat(d["json"]["created_at"].replace("Z", "+00:00"))
                 for d in events if d["json"]["type"] == "generation.progress"]
        assert len(times) >= 2, [d["json"]["type"] for d in events]
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
        assert min(gaps) >= 1.0, gaps
        http.close()
    finally:
        for p in procs:
            p.stop()
        rs.cleanup()


def _slow_job(redis_url: str, url: str) -> str:
    """A job with a webhook asking for progress whose rows take 0.4 s each (test hooks)."""
    import redis

    from worker.protocol import GenerationParams, JobStore, Settings

    store = JobStore(redis.Redis.from_url(redis_url), Settings(redis_url=redis_url))
    job_id, _ = store.create_job(GenerationParams(prompt="a blue square", seed=2),
                                 test_hooks={"row_delay": 0.4},
                                 webhook=(url, ["progress", "completed"]))
    return job_id
