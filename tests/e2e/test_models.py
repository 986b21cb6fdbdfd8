"""Several models at once (issue 17 phase B): one queue per model, jobs routed by name,
models registered for good so their jobs wait for a worker (scale to zero), and a worker
refusing a name already registered with other weights. Real Redis, uvicorn and workers."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from app.redis_server import RedisServer, free_port
from tests.worker.helpers import (
    Proc,
    finished,
    live_worker_names,
    make_tiny_checkpoint,
    poll_job,
    start_api,
    start_worker,
    wait_for,
    wait_worker_ready,
)

# Two models told apart by their size: a job's images show which one drew them.
SIZES = {"alpha": 8, "beta": 4}
JOBS_PER_MODEL = 6


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {name: make_tiny_checkpoint(folder / f"{name}.pth", steps=5, image_size=size)
            for name, size in SIZES.items()}


def _submit(http: httpx.Client, model: str | None, seed: int) -> httpx.Response:
    body: dict[str, object] = {"prompt": "a red square", "seed": seed}
    if model is not None:
        body["model"] = model
    return http.post("/v1/generations", json=body)


def test_two_models_side_by_side_and_a_model_without_workers(
        checkpoints: dict[str, Path], tmp_path: Path) -> None:
    rs = RedisServer().start()
    port = free_port()
    procs: list[Proc] = []
    try:
        procs.append(start_api(rs.url, port, tmp_path / "api.log", PROMPTPIX_RATE_LIMIT="0",
                               PROMPTPIX_MODELS="alpha,beta"))
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        # Two models known, none named: the request must say which.
        r = _submit(http, None, 1)
        assert r.status_code == 422 and r.json()["error"]["code"] == "model_required", r.text
        assert "alpha, beta" in r.json()["error"]["message"]
        r = _submit(http, "gamma", 1)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        # Declared, no worker yet: accepted, and waits in its own queue.
        early = _submit(http, "beta", 99)
        assert early.status_code == 202, early.text
        r = redis.Redis.from_url(rs.url)
        assert r.llen("rq:queue:generate:beta") == 1 and r.llen("rq:queue:generate:alpha") == 0
        # Scores resolve their model the same way and wait in that model's queue.
        png = io.BytesIO()
        Image.new("RGB", (8, 8), (255, 0, 0)).save(png, format="PNG")
        score = {"image": base64.b64encode(png.getvalue()).decode(), "captions": ["red"]}
        s = http.post("/v1/scores", json=score)
        assert s.status_code == 422 and s.json()["error"]["code"] == "model_required", s.text
        s = http.post("/v1/scores", json={**score, "model": "beta"})
        assert s.status_code == 202, s.text
        assert r.llen("rq:queue:generate:beta") == 2 and r.llen("rq:queue:generate:alpha") == 0
        assert http.delete(s.json()["status_url"]).status_code == 200
        assert r.llen("rq:queue:generate:beta") == 1

        alpha = start_worker(rs.url, checkpoints["alpha"], tmp_path / "alpha.log")
        procs.append(alpha)
        wait_worker_ready(rs.url, alpha)
        # Concurrent submissions for both models while only alpha has a worker.
        asks = [("alpha" if k % 2 else "beta", k) for k in range(2 * JOBS_PER_MODEL)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda a: _submit(http, *a), asks))
        assert all(a.status_code == 202 for a in answers), [a.text for a in answers]
        ids = {a.json()["id"]: model for a, (model, _) in zip(answers, asks, strict=True)}
        ids[early.json()["id"]] = "beta"
        for job_id, model in ids.items():
            if model == "alpha":
                assert poll_job(http, job_id, finished)["status"] == "succeeded"
        # alpha's worker took none of beta's jobs: they still wait, in beta's queue.
        beta_ids = [j for j, m in ids.items() if m == "beta"]
        assert all(http.get(f"/v1/generations/{j}").json()["status"] == "queued"
                   for j in beta_ids)
        assert r.llen("rq:queue:generate:beta") == len(beta_ids)
        listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert listed["alpha"]["workers"] == 1 and listed["beta"]["workers"] == 0
        assert listed["alpha"]["image_size"] == 8 and listed["beta"]["image_size"] is None

        before = live_worker_names(rs.url)
        beta = start_worker(rs.url, checkpoints["beta"], tmp_path / "beta.log")
        procs.append(beta)
        wait_worker_ready(rs.url, beta, before=before)
        for job_id, model in ids.items():
            job = poll_job(http, job_id, finished)
            assert job["status"] == "succeeded", job
            # Each job names the model it asked for, and ran on it (its size shows it).
            assert job["params"]["model"] == model and job["model"]["id"] == model
            assert job["model"]["image_size"] == SIZES[model]
        listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert {k: v["workers"] for k, v in listed.items()} == {"alpha": 1, "beta": 1}
        # The API checks a request against the named model's facts (no classes here).
        r = http.post("/v1/generations", json={"prompt": "a red square", "model": "beta",
                                               "class_label": 0})
        assert r.status_code == 422 and "model 'beta' (0 classes)" in r.text, r.text

        # Another checkpoint under a registered name: the worker refuses to start.
        impostor = start_worker(rs.url, checkpoints["beta"], tmp_path / "impostor.log",
                                PROMPTPIX_MODEL_NAME="alpha")
        procs.append(impostor)
        wait_for(lambda: not impostor.alive(), 60, "the impostor worker to exit")
        assert impostor.proc.returncode == 2
        assert "model 'alpha' is registered with checksum" in impostor.log()
        http.close()
    finally:
        for p in procs:
            p.stop()
        rs.cleanup()
