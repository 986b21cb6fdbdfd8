"""End to end over real HTTP: uvicorn API + a real worker process + a real Redis."""

from __future__ import annotations

import io
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from app.redis_server import RedisServer, free_port
from tests.worker.helpers import (
    ROOT,
    Proc,
    finished,
    make_tiny_checkpoint,
    poll_job,
    start_api,
    start_worker,
    wait_for,
    wait_worker_ready,
)
from worker.protocol import GenerationParams, JobStore, Settings

JOB_TIMEOUT_S = 4


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained for a few steps, written once per session."""
    return make_tiny_checkpoint(tmp_path_factory.getbasetemp() / "tiny_serving.pth")


class Stack:
    """One Redis, one API, one worker for the module."""

    def __init__(self, tmp: Path, checkpoint: Path) -> None:
        self.redis = RedisServer().start()
        self.port = free_port()
        self.api = start_api(self.redis.url, self.port, tmp / "api.log")
        self.worker: Proc = start_worker(self.redis.url, checkpoint, tmp / "worker.log",
                                         PROMPTPIX_JOB_TIMEOUT=str(JOB_TIMEOUT_S))
        self.worker_name = wait_worker_ready(self.redis.url, self.worker)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        self.store = JobStore(redis.Redis.from_url(self.redis.url),
                              Settings(redis_url=self.redis.url))

    def close(self) -> None:
        self.http.close()
        self.worker.stop()
        self.api.stop()
        self.redis.cleanup()

    def submit_with_hooks(self, hooks: dict, **params: object) -> str:
        """Enqueue directly (test hooks are not reachable over HTTP)."""
        p = GenerationParams(**{"prompt": "a red square", "seed": 3, **params})
        job_id, _ = self.store.create_job(p, test_hooks=hooks)
        return job_id

    def worker_info(self) -> dict:
        return next(w for w in self.store.live_workers() if w["name"] == self.worker_name)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("serving"), tiny_checkpoint)
    try:
        yield s
    finally:
        s.close()


def png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_submit_poll_pngs(stack: Stack) -> None:
    assert stack.http.get("/readyz").status_code == 200
    listing = stack.http.get("/v1/models").json()
    models = listing["data"]
    assert listing["object"] == "list" and len(models) == 1 and models[0]["object"] == "model"
    assert models[0]["image_size"] == 8 and models[0]["workers"] == 1
    # The id is the checkpoint's file stem; the content hash is the checksum.
    assert models[0]["id"] == "tiny_serving" and len(models[0]["checksum"]) == 16
    r = stack.http.post("/v1/generations", json={"prompt": "a red square", "num_images": 3,
                                                 "seed": 11})
    assert r.status_code == 202
    job = poll_job(stack.http, r.json()["id"], finished)
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["model"]["id"] == models[0]["id"]
    assert len(job["images"]) == 3 and job["started_at"] and job["finished_at"]
    for k, url in enumerate(job["images"]):
        resp = stack.http.get(url)
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
        img = png(resp.content)
        assert img.size == (8, 8) and img.mode == "RGB"
        assert img.text["prompt"] == "a red square" and img.text["seed"] == str(11 + k)
        assert img.text["model_id"] == models[0]["id"]
        assert json.loads(img.text["parameters"])["seed"] == 11 + k
    assert stack.http.get(f"/v1/generations/{job['id']}/images/3.png").status_code == 404


def test_class_label_checked_against_the_served_model(stack: Stack) -> None:
    """The tiny model has no classes: any class label is a 422 before it is queued."""
    (model,) = stack.http.get("/v1/models").json()["data"]
    label = int(model.get("num_classes") or 0)
    r = stack.http.post("/v1/generations", json={"prompt": "a red square", "class_label": label})
    assert r.status_code == 422 and r.json()["error"]["field"] == "class_label", r.text
    assert stack.store.queue_depth() == 0


def test_same_seed_reproduces(stack: Stack) -> None:
    body = {"prompt": "a blue square", "num_images": 2, "seed": 42, "temperature": 0.9}
    runs = []
    for _ in range(2):
        job = poll_job(stack.http, stack.http.post("/v1/generations", json=body).json()["id"],
                       finished)
        runs.append([stack.http.get(u).content for u in job["images"]])
    assert runs[0] == runs[1]
    # Image k uses seed + k whatever num_images is.
    one = poll_job(stack.http, stack.http.post(
        "/v1/generations", json={**body, "num_images": 1, "seed": 43}).json()["id"], finished)
    assert png(stack.http.get(one["images"][0]).content).tobytes() == png(runs[0][1]).tobytes()


def test_progress_monotonic_and_preview(stack: Stack) -> None:
    job_id = stack.submit_with_hooks({"row_delay": 0.3}, num_images=2)
    seen: list[float] = []
    preview = None

    def done() -> bool:
        nonlocal preview
        job = stack.http.get(f"/v1/generations/{job_id}").json()
        if job["status"] == "running":
            seen.append(job["progress"])
            if preview is None and job["preview_url"] and 0 < job["progress"] < 1:
                preview = stack.http.get(job["preview_url"])
        return finished(job)

    wait_for(done, 30, "the slow job", every=0.1)
    assert seen == sorted(seen) and len(set(seen)) >= 3, seen
    assert preview is not None and preview.status_code == 200
    strip = png(preview.content)
    assert strip.size == (16, 8)  # two 8x8 images side by side
    assert strip.getpixel((0, 7)) == (128, 128, 128)  # last row not sampled yet: grey


def test_cancel_running_and_queued(stack: Stack) -> None:
    running = stack.submit_with_hooks({"row_delay": 0.5})
    queued = stack.http.post("/v1/generations", json={"prompt": "a red square"}).json()["id"]
    poll_job(stack.http, running, lambda j: j["status"] == "running" and j["progress"] > 0)
    assert stack.http.get(f"/v1/generations/{queued}").json()["queue_position"] == 0
    r = stack.http.delete(f"/v1/generations/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    r = stack.http.delete(f"/v1/generations/{running}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    # The worker lets go within about one row (0.5 s) and is free again.
    wait_for(lambda: stack.worker_info()["job"] is None, 3, "the worker to drop the job")
    final = stack.http.get(f"/v1/generations/{running}").json()
    assert final["status"] == "canceled" and final["images"] == [] and final["progress"] < 1
    assert stack.http.get(f"/v1/generations/{queued}").json()["started_at"] is None
    assert stack.http.delete(f"/v1/generations/{running}").status_code == 409


def test_oom_fails_job_and_worker_keeps_serving(stack: Stack) -> None:
    job = poll_job(stack.http, stack.submit_with_hooks({"oom": True}), finished)
    assert job["status"] == "failed" and job["error"]["code"] == "out_of_memory"
    ok = poll_job(stack.http, stack.http.post(
        "/v1/generations", json={"prompt": "a red square"}).json()["id"], finished)
    assert ok["status"] == "succeeded"


def test_class_label_the_model_lacks(stack: Stack) -> None:
    # class_label 3 on a model without classes: the API refuses it, the worker too (the job
    # fails alone with `invalid_request`, API.md "Errors a job can end with").
    r = stack.http.post("/v1/generations", json={"prompt": "x", "class_label": 3})
    assert r.status_code == 422 and r.json()["error"]["field"] == "class_label"
    job = poll_job(stack.http, stack.submit_with_hooks({}, class_label=3), finished)
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_request"


def test_timeout(stack: Stack) -> None:
    job = poll_job(stack.http, stack.submit_with_hooks({"row_delay": 1.0}), finished,
                   timeout=JOB_TIMEOUT_S + 10)
    assert job["status"] == "failed" and job["error"]["code"] == "timeout"


def test_metrics_move(stack: Stack) -> None:
    port = stack.worker_info()["metrics_port"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    for name in ("promptpix_jobs_completed_total", "promptpix_queue_wait_seconds",
                 "promptpix_generation_seconds", "promptpix_tokens_generated_total",
                 "promptpix_images_generated_total", "promptpix_sampling_tokens_per_second",
                 "promptpix_model_loaded"):
        assert name in text, name
    assert 'promptpix_jobs_completed_total{status="succeeded"}' in text
    line = next(x for x in text.splitlines()
                if x.startswith("promptpix_images_generated_total "))
    assert float(line.split()[1]) > 0
    api = stack.http.get("/metrics").text
    assert "promptpix_workers 1.0" in api and "promptpix_jobs_submitted_total" in api


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (from /proc/net/tcp{,6})."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                raw = bytes.fromhex(addr)
                words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]  # host order
                packed = b"".join(words)
                found.add(str(ipaddress.ip_address(packed)) if width == 8
                          else str(ipaddress.IPv6Address(packed)))
    return found


def test_worker_metrics_listen_on_loopback_only(stack: Stack) -> None:
    port = stack.worker_info()["metrics_port"]
    assert listening_addresses(port) == {"127.0.0.1"}
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200


def test_worker_metrics_host_setting(tmp_path: Path) -> None:
    """PROMPTPIX_WORKER_METRICS_HOST=0.0.0.0 (what compose sets) listens everywhere."""
    port = free_port()
    code = (f"import time; from worker.metrics import serve_metrics; serve_metrics({port}); "
            "print('up', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT),
                                 "PROMPTPIX_WORKER_METRICS_HOST": "0.0.0.0"})
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        assert listening_addresses(port) == {"0.0.0.0"}
    finally:
        proc.kill()
        proc.wait(10)
