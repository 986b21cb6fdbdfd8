"""Score jobs, exact bits/dim of generated images, best_of and `Prefer: wait`, end to end:
real Redis, a real `promptpix worker` with a tiny trained model, a real uvicorn API."""

from __future__ import annotations

import base64
import io
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch
from PIL import Image

from app.redis_server import free_port
from tests.worker.helpers import (
    CAPTIONS,
    COLOURS,
    Proc,
    make_tiny_checkpoint,
    served,
    start_api,
    start_worker,
    wait_for,
    wait_worker_ready,
)

SIZE = 8
UPLOAD_LIMIT = 300_000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.getbasetemp() / "tiny_scores.pth", steps=60)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> Any:
    from model import load_checkpoint

    torch.set_grad_enabled(False)
    m, _ = load_checkpoint(checkpoint, map_location="cpu")
    yield m.eval()
    torch.set_grad_enabled(True)


@pytest.fixture(scope="module")
def stack(redis_server: Any, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[httpx.Client]:
    with served(redis_server.url, checkpoint, tmp_path_factory.mktemp("scores"),
                PROMPTPIX_RATE_LIMIT="0",
                PROMPTPIX_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT)) as client:
        yield client


def png_b64(colour: tuple[int, int, int], size: int = SIZE, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def poll(client: httpx.Client, url: str, timeout: float = 90.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        r = client.get(url)
        assert r.status_code == 200, r.text
        job = r.json()
        return job if job["status"] in ("succeeded", "failed", "canceled") else None

    return dict(wait_for(done, timeout, f"{url} to finish", every=0.05))


def test_score_ranks_captions_with_exact_bits(stack: httpx.Client, model: Any) -> None:
    """A red square scored against the four training captions: results in request order,
    bits/dim equal to model.nll of the prepared image, posterior = softmax(-bits*T*ln2) of
    the tolerant bits, red ranked first, the unconditional bits, a viewable heatmap."""
    from model import prepare_image

    image = png_b64(COLOURS["red"])
    captions = [CAPTIONS[1], CAPTIONS[0], CAPTIONS[2], CAPTIONS[3]]  # red second
    r = stack.post("/v1/scores", json={"image": image, "captions": captions})
    assert r.status_code == 202, r.text
    created = r.json()
    assert set(created) >= {"id", "status", "status_url"}
    assert created["status_url"] == f"/v1/scores/{created['id']}"
    job = poll(stack, created["status_url"])
    assert job["status"] == "succeeded", job
    assert [e["caption"] for e in job["results"]] == captions
    assert job["resized"] is False
    assert job["ranking"][0] == 1, job  # "a red square"
    assert "image" not in job["params"] and job["params"]["tolerance"] == 0.01

    x = prepare_image(base64.b64decode(image), SIZE, 3)
    want = model.nll(x[None].expand(4, -1, -1, -1), captions).tolist()
    got = [e["bits_per_dim"] for e in job["results"]]
    assert np.allclose(got, want, atol=1e-4), (got, want)
    uncond = float(model.nll(x[None], [""])[0])
    assert math.isclose(job["unconditional_bits_per_dim"], uncond, abs_tol=1e-4)
    T = SIZE * SIZE * 3
    tolerant = np.array([e["bits_per_dim_tolerant"] for e in job["results"]])
    # Mixing in a uniform share eps costs an expected sub-pixel at most -log2(1 - eps) bits
    # and caps an unexpected one at log2(256 / eps).
    assert (tolerant <= np.array(got) - math.log2(0.99) + 1e-9).all()
    logits = -tolerant * T * math.log(2)
    posterior = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    probs = [e["probability"] for e in job["results"]]
    assert np.allclose(probs, posterior, atol=1e-6) and math.isclose(sum(probs), 1, rel_tol=1e-6)
    assert job["ranking"] == sorted(range(4), key=lambda n: -probs[n])

    heat = stack.get(job["surprise_url"])
    assert heat.status_code == 200 and heat.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(heat.content))
    assert img.width >= 256 and img.height >= 256

    # A job id read under the other kind's route is 404.
    assert stack.get(f"/v1/generations/{created['id']}").status_code == 404
    assert stack.get(f"/v1/generations/{created['id']}/images/0.png").status_code == 404
    # Scores share the owner's job index but are not listed as generations.
    listed = stack.get("/v1/generations")
    assert listed.status_code == 200, listed.text
    assert created["id"] not in {j["id"] for j in listed.json()["data"]}
    # It waited on its model's queue (resolved as for generations: the only one served).
    assert job["model"]["id"] == stack.get("/v1/models").json()["data"][0]["id"]
    # A finished score cannot be canceled.
    assert stack.delete(created["status_url"]).json()["error"]["code"] == "not_cancelable"


def test_score_resizes_other_sizes_and_takes_jpeg(stack: httpx.Client) -> None:
    r = stack.post("/v1/scores", json={"image": png_b64(COLOURS["blue"], 20, "JPEG"),
                                       "captions": ["a blue square"], "tolerance": 0})
    assert r.status_code == 202, r.text
    job = poll(stack, r.json()["status_url"])
    assert job["status"] == "succeeded", job
    assert job["resized"] is True
    assert job["results"][0]["probability"] == 1.0
    assert "bits_per_dim_tolerant" not in job["results"][0] or \
        job["results"][0]["bits_per_dim_tolerant"] is None


def test_unreadable_image_fails_alone_invalid_request(stack: httpx.Client) -> None:
    """A file with a PNG signature but no image passes the API's format check; the worker
    fails that job `invalid_request` and serves the next one."""
    bad = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4).decode()
    first = stack.post("/v1/scores", json={"image": bad, "captions": ["a red square"]})
    second = stack.post("/v1/scores", json={"image": png_b64(COLOURS["green"]),
                                            "captions": ["a green square"]})
    assert first.status_code == second.status_code == 202
    failed = poll(stack, first.json()["status_url"])
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "invalid_request", failed
    assert "cannot take this image" in failed["error"]["message"]
    assert poll(stack, second.json()["status_url"])["status"] == "succeeded"


def test_api_checks_format_size_and_captions(stack: httpx.Client) -> None:
    def post(body: dict[str, Any]) -> httpx.Response:
        return stack.post("/v1/scores", json=body)

    r = post({"image": base64.b64encode(b"GIF89a....").decode(), "captions": ["x"]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "image", r.text
    assert post({"image": "%%%not base64", "captions": ["x"]}).status_code == 422
    assert post({"image": png_b64((0, 0, 0)), "captions": []}).status_code == 422
    assert post({"image": png_b64((0, 0, 0)), "captions": ["x"] * 33}).status_code == 422
    assert post({"image": png_b64((0, 0, 0)), "captions": ["a", "b"],
                 "class_labels": [0]}).status_code == 422
    assert post({"image": png_b64((0, 0, 0)), "captions": ["a"],
                 "tolerance": 0.9}).status_code == 422
    r = post({"image": png_b64((0, 0, 0)), "captions": ["a"], "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # The upload routes' body limit is PROMPTPIX_MAX_UPLOAD_BYTES; others keep 64 KiB.
    big = png_b64((0, 0, 0)) + "A" * 100_000
    assert post({"image": big, "captions": ["a"]}).status_code == 202  # over 64 KiB: taken
    huge = "A" * (UPLOAD_LIMIT + 10)
    assert post({"image": huge, "captions": ["a"]}).status_code == 413
    r = stack.post("/v1/generations", json={"prompt": "a" * 10, "pad": "A" * UPLOAD_LIMIT})
    assert r.status_code == 413
    r = stack.post("/v1/images/generations", json={"prompt": "a" * 10, "pad": "A" * 100_000})
    assert r.status_code == 413  # not an upload route: 64 KiB


def test_idempotency_keys_are_scoped_by_kind(stack: httpx.Client) -> None:
    headers = {"Idempotency-Key": "same-key-both-kinds"}
    gen = stack.post("/v1/generations", json={"prompt": "a red square", "seed": 1},
                     headers=headers)
    score = stack.post("/v1/scores", json={"image": png_b64(COLOURS["red"]),
                                           "captions": ["a red square"]}, headers=headers)
    assert gen.status_code == score.status_code == 202, (gen.text, score.text)
    assert gen.json()["id"] != score.json()["id"]
    again = stack.post("/v1/scores", json={"image": png_b64(COLOURS["red"]),
                                           "captions": ["a red square"]}, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == score.json()["id"]
    poll(stack, score.json()["status_url"])
    poll(stack, gen.json()["status_url"])


def test_generated_images_carry_exact_bits_and_best_of_keeps_the_most_probable(
        stack: httpx.Client, model: Any) -> None:
    """best_of=4, num_images=2: the two kept images are the two most probable of the four
    the same seeds give in-process; their bits/dim are in the view and the PNG chunks, and
    equal model.nll of the PNGs."""
    body = {"prompt": "a green square", "num_images": 2, "best_of": 4, "seed": 77}
    r = stack.post("/v1/generations", json=body, headers={"Prefer": "wait=60"})
    assert r.status_code == 200, r.text  # finished within the wait: the view itself
    job = r.json()
    assert job["status"] == "succeeded" and len(job["images"]) == 2
    bits = job["image_bits_per_dim"]
    assert len(bits) == 2 and bits[0] <= bits[1]

    images, all_bits = model.generate(["a green square"], num_images=4,
                                      seed=[77, 78, 79, 80], return_bits=True)
    best = sorted(range(4), key=lambda k: float(all_bits[k]))[:2]
    assert np.allclose(bits, [float(all_bits[k]) for k in best], atol=1e-4)
    for n, url in enumerate(job["images"]):
        png = Image.open(io.BytesIO(stack.get(url).content))
        assert math.isclose(float(png.text["image_bits_per_dim"]), bits[n], abs_tol=1e-5)
        x = torch.from_numpy(np.array(png.convert("RGB")).transpose(2, 0, 1).copy())
        assert torch.equal(x, images[best[n]])
        assert math.isclose(float(model.nll(x[None], ["a green square"])[0]), bits[n],
                            abs_tol=1e-4)

    # A score may name a finished generation's image: the same exact bits/dim.
    r = stack.post("/v1/scores", json={"job_id": job["id"], "image_index": 1, "tolerance": 0,
                                       "captions": ["a green square", "a red square"]},
                   headers={"Prefer": "wait=60"})
    assert r.status_code == 200, r.text
    assert math.isclose(r.json()["results"][0]["bits_per_dim"], bits[1], abs_tol=1e-4)
    for bad, code in (({"job_id": job["id"], "image_index": 2}, 404),
                      ({"job_id": r.json()["id"], "image_index": 0}, 404),  # a score's id
                      ({"job_id": job["id"]}, 422),
                      ({"job_id": job["id"], "image_index": 0,
                        "image": png_b64(COLOURS["red"])}, 422)):
        refused = stack.post("/v1/scores", json={**bad, "captions": ["x"]})
        assert refused.status_code == code, (bad, refused.text)

    too_many = stack.post("/v1/generations", json={**body, "best_of": 9})
    assert too_many.status_code == 422 and too_many.json()["error"]["field"] == "best_of"
    fewer = stack.post("/v1/generations", json={**body, "best_of": 1})
    assert fewer.status_code == 422


def test_prefer_wait_on_scores(stack: httpx.Client) -> None:
    """`Prefer: wait=N` answers 200 with the finished score view; without it, 202."""
    body = {"image": png_b64(COLOURS["white"]), "captions": ["a white square", "a red square"]}
    start = time.monotonic()
    r = stack.post("/v1/scores", json=body, headers={"Prefer": "respond-async, wait=30"})
    assert r.status_code == 200, r.text
    assert time.monotonic() - start < 30
    view = r.json()
    assert view["status"] == "succeeded" and view["ranking"][0] == 0, view
    assert r.headers["Location"] == f"/v1/scores/{view['id']}"
    assert stack.post("/v1/scores", json=body).status_code == 202


def test_prefer_wait_holds_no_thread_and_times_out_to_202(tmp_path: Path) -> None:
    """No worker (a Redis of its own): 45 submissions waiting at once (more than the 40
    threads of the pool) all answer 202 after their wait, while a threaded status read is
    answered at once; a client that disconnects mid-wait does not cancel its job."""
    import asyncio

    from app.redis_server import RedisServer

    server = RedisServer().start()
    redis_url = server.url
    port = free_port()
    api = start_api(redis_url, port, tmp_path / "api.log", PROMPTPIX_RATE_LIMIT="0",
                    PROMPTPIX_MAX_QUEUED_PER_KEY="0", PROMPTPIX_MODELS="m1")
    base = f"http://127.0.0.1:{port}"
    try:
        first = httpx.post(f"{base}/v1/generations", json={"prompt": "a red square"})
        assert first.status_code == 202

        async def scenario() -> tuple[list[httpx.Response], float, float]:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                start = time.monotonic()
                waits = [asyncio.create_task(client.post(
                    "/v1/generations", json={"prompt": f"a red square {n}"},
                    headers={"Prefer": "wait=3"})) for n in range(45)]
                await asyncio.sleep(1.0)
                t0 = time.monotonic()
                status = await client.get(f"/v1/generations/{first.json()['id']}")
                assert status.status_code == 200
                read_s = time.monotonic() - t0
                answers = await asyncio.gather(*waits)
                return answers, read_s, time.monotonic() - start

        answers, read_s, total_s = asyncio.run(scenario())
        assert [a.status_code for a in answers] == [202] * 45
        assert read_s < 1.0, f"a status read waited {read_s:.2f} s behind the waiting POSTs"
        assert 3.0 <= total_s < 15, total_s

        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/scores", json={"image": png_b64((1, 2, 3)),
                                                  "captions": ["a"]},
                       headers={"Prefer": "wait=5"}, timeout=0.5)
        r = redis.Redis.from_url(redis_url)
        kinds = [r.hget(k, "kind") for k in r.scan_iter("promptpix:job:*")
                 if r.type(k) == b"hash"]
        assert kinds.count(b"score") == 1
        score_key = next(k for k in r.scan_iter("promptpix:job:*")
                         if r.type(k) == b"hash" and r.hget(k, "kind") == b"score")
        time.sleep(0.5)
        assert r.hget(score_key, "status") == b"queued"
    finally:
        api.stop()
        server.cleanup()


def test_cli_score_prints_the_ranking(stack: httpx.Client, tmp_path: Path) -> None:
    """`promptpix score IMAGE --caption ... --caption ...` against the real server."""
    import subprocess
    import sys

    image = tmp_path / "red.png"
    image.write_bytes(base64.b64decode(png_b64(COLOURS["red"])))
    heat = tmp_path / "heat.png"
    out = subprocess.run(
        [sys.executable, "-m", "promptpix_cli", "score", str(image), "--caption",
         "a blue square", "--caption", "a red square", "--surprise", str(heat),
         "--url", str(stack.base_url)],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["rank", "probability", "bits/dim", "tolerant", "caption"]
    assert lines[1].split()[0] == "1" and lines[1].endswith("a red square"), out.stdout
    assert lines[2].endswith("a blue square")
    assert lines[3].startswith("unconditional (empty prompt):")
    assert Image.open(heat).format == "PNG"
    bad = subprocess.run([sys.executable, "-m", "promptpix_cli", "score", str(image),
                          "--caption", "x", "--tolerance", "2", "--url", str(stack.base_url)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "tolerance" in bad.stderr, bad.stderr


def test_a_generation_batch_stops_at_a_score_job(checkpoint: Path, tmp_path: Path) -> None:
    """Queue order generate, score, generate under PROMPTPIX_MAX_BATCH=8: the first
    generation's batch stops gathering at the score job (a batch holds one kind), the
    score runs next, the second generation after it; all three succeed."""
    from app.redis_server import RedisServer
    from worker.protocol import GenerationParams, JobStore, Keys, ScoreParams, Settings

    server = RedisServer().start()
    worker = None
    try:
        store = JobStore(redis.Redis.from_url(server.url), Settings(redis_url=server.url),
                         model=checkpoint.stem)  # its worker serves generate:<stem>
        first, _ = store.create_job(GenerationParams(prompt="a red square", seed=1))
        upload = base64.b64decode(png_b64(COLOURS["red"]))
        score, _ = store.create_job(ScoreParams(captions=["a red square"]), upload=upload)
        last, _ = store.create_job(GenerationParams(prompt="a blue square", seed=2))
        worker = start_worker(server.url, checkpoint, tmp_path / "w.log",
                              PROMPTPIX_MAX_BATCH="8")
        wait_for(lambda: all(store.get(j).status.finished for j in (first, score, last)),
                 90, "the three jobs")
        jobs = {j: store.get(j) for j in (first, score, last)}
        assert [jobs[j].status.value for j in (first, score, last)] == ["succeeded"] * 3, \
            worker.log()[-3000:]
        assert jobs[score].started_at >= jobs[first].finished_at
        assert jobs[last].started_at >= jobs[score].finished_at
        assert "batch of" not in worker.log()
        assert jobs[score].result["ranking"] == [0]
        assert store.r.exists(Keys.upload(score)) == 0  # the upload goes once scored
    finally:
        if worker is not None:
            worker.stop()
        server.cleanup()



def test_a_lost_score_is_handed_on_as_a_score(checkpoint: Path, tmp_path: Path) -> None:
    """A worker killed (SIGKILL) while scoring: the reaper puts the job back as a score
    (worker.jobs.score, its upload still there) and the next worker finishes it."""
    from app.redis_server import RedisServer
    from worker.protocol import JobStatus, JobStore, ScoreParams, Settings

    server = RedisServer().start()
    procs: list[Proc] = []
    try:
        store = JobStore(redis.Redis.from_url(server.url), Settings(redis_url=server.url),
                         model=checkpoint.stem)  # its worker serves generate:<stem>
        first = start_worker(server.url, checkpoint, tmp_path / "w1.log")
        procs.append(first)
        wait_worker_ready(server.url, first)
        upload = base64.b64decode(png_b64(COLOURS["red"]))
        job_id, _ = store.create_job(ScoreParams(captions=["a red square", "a blue square"]),
                                     upload=upload, test_hooks={"score_delay": 30.0})
        wait_for(lambda: store.get(job_id).status is JobStatus.RUNNING, 30, "the score to run")
        first.kill9()
        store.r.hset(f"promptpix:job:{job_id}", "test_hooks", "")  # attempt 2 runs at once
        second = start_worker(server.url, checkpoint, tmp_path / "w2.log")
        procs.append(second)
        wait_for(lambda: store.get(job_id).status.finished, 90, "the handed-on score")
        job = store.get(job_id)
        assert job.status is JobStatus.SUCCEEDED, (job, second.log()[-2000:])
        assert job.attempt == 2 and job.kind.value == "score"
        assert job.result["ranking"][0] == 0
    finally:
        for p in procs:
            p.stop()
        server.cleanup()
