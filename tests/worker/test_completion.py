"""Completion and negative prompts through a real worker (real Redis, real RQ, batching)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from PIL import Image

from model import load_checkpoint, prepare_image
from tests.worker.helpers import (
    Proc,
    make_tiny_checkpoint,
    start_worker,
    wait_for,
    wait_worker_ready,
)
from worker.protocol import GenerationParams, JobStore, Keys, Settings

SIZE = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.getbasetemp() / "tiny_completion.pth")


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url), Settings(redis_url=redis_url),
                    model="tiny_completion")


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def init_png(size: int = 12, seed: int = 0) -> bytes:
    """Noise of another size than the model's: the worker resizes and crops it."""
    arr = np.random.default_rng(seed).integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def pixels(store: JobStore, job_id: str) -> torch.Tensor:
    out = []
    for k in range(store.get(job_id).images):
        data = store.get_blob(Keys.image(job_id, k)) or b""
        out.append(torch.from_numpy(np.array(Image.open(io.BytesIO(data)))).permute(2, 0, 1))
    return torch.stack(out)


def test_completions_batched_with_plain_jobs_and_canceled(
    redis_url: str, store: JobStore, checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    """Queued before the worker starts, so they share one batch: a completion (guided,
    sampled, with a negative prompt), a plain job, a greedy completion, and a slow
    completion that is canceled. Each kept row is pixel-equal to the prepared init image,
    and every image equals the model's own sampler run alone with the same seeds."""
    png = init_png()
    comp = dict(prompt="a red square", num_images=2, seed=5, guidance_scale=2.0,
                temperature=0.9, negative_prompt="a blue square", keep_rows=3,
                has_init_image=True)
    plain = dict(prompt="a blue square", num_images=2, seed=7, guidance_scale=2.0)
    greedy = dict(prompt="a green square", num_images=1, seed=9, top_k=1, keep_rows=5,
                  has_init_image=True)
    slow = dict(prompt="a red square", num_images=1, seed=11, keep_rows=2,
                has_init_image=True)
    ids = [store.create_job(GenerationParams(**comp), upload=png)[0],  # type: ignore[arg-type]
           store.create_job(GenerationParams(**plain))[0],  # type: ignore[arg-type]
           store.create_job(GenerationParams(**greedy), upload=png)[0]]  # type: ignore[arg-type]
    slow_id = store.create_job(GenerationParams(**slow), upload=png,  # type: ignore[arg-type]
                               test_hooks={"row_delay": 0.3})[0]
    w = start_worker(redis_url, checkpoint, tmp_path / "w.log", PROMPTPIX_MAX_BATCH="16",
                     PROMPTPIX_TEST_HOOKS="1")
    procs.append(w)
    wait_worker_ready(redis_url, w)
    wait_for(lambda: store.get(slow_id).progress > 0, 60, "the batch to start")
    assert store.cancel(slow_id) == "ok"
    wait_for(lambda: all(store.get(j).status.finished for j in [*ids, slow_id]), 60, "jobs")
    assert "batch of 4 jobs (6 images)" in w.log()
    assert store.get(slow_id).status == "canceled"
    assert [store.get(j).status for j in ids] == ["succeeded"] * 3

    model, _ = load_checkpoint(checkpoint, map_location="cpu")
    init = prepare_image(png, SIZE, 3)
    for job_id, params in zip(ids, (comp, plain, greedy), strict=True):
        got = pixels(store, job_id)
        keep = params.get("keep_rows", 0)
        assert torch.equal(got[:, :, :keep], init[:, :keep].expand(len(got), -1, -1, -1))
        kw = {k: v for k, v in params.items()
              if k not in ("prompt", "num_images", "seed", "has_init_image")}
        want = model.generate([params["prompt"]], num_images=params["num_images"],
                              seed=[params["seed"] + k for k in range(params["num_images"])],
                              prefix=init if keep else None, **kw)
        assert torch.equal(got, want), job_id
        # The upload goes once the job succeeded.
        assert store.get_blob(Keys.upload(job_id)) is None


def test_bad_init_image_fails_alone_invalid_request(
    redis_url: str, store: JobStore, checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    bad = store.create_job(GenerationParams(prompt="a red square", seed=1, keep_rows=2,
                                            has_init_image=True),
                           upload=b"\x89PNG\r\n\x1a\nnot really")[0]
    big = store.create_job(GenerationParams(prompt="a red square", seed=1, keep_rows=SIZE,
                                            has_init_image=True), upload=init_png())[0]
    good = store.create_job(GenerationParams(prompt="a red square", seed=1))[0]
    w = start_worker(redis_url, checkpoint, tmp_path / "w.log", PROMPTPIX_MAX_BATCH="8")
    procs.append(w)
    wait_worker_ready(redis_url, w)
    wait_for(lambda: all(store.get(j).status.finished for j in (bad, big, good)), 60, "jobs")
    assert store.get(good).status == "succeeded"
    for job_id, why in ((bad, "cannot take this image"), (big, "keep_rows must be 1..7")):
        job = store.get(job_id)
        assert job.status == "failed" and job.error_code == "invalid_request", job
        assert why in (job.error_message or "")


def test_first_preview_shows_the_kept_rows(
    redis_url: str, store: JobStore, checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    """Before the first sampled row, a completion's preview is its init image's kept rows
    over grey (one copy per image), not an all-grey strip."""
    png, keep = init_png(seed=3), 3
    job_id = store.create_job(GenerationParams(prompt="a red square", num_images=2, seed=1,
                                               keep_rows=keep, has_init_image=True),
                              upload=png, test_hooks={"row_delay": 3.0})[0]
    w = start_worker(redis_url, checkpoint, tmp_path / "w.log", PROMPTPIX_TEST_HOOKS="1")
    procs.append(w)
    wait_worker_ready(redis_url, w)
    wait_for(lambda: store.get(job_id).has_preview, 60, "the first preview")
    job = store.get(job_id)
    assert job.progress == 0.0, "the first row came before the preview was read"
    strip = np.array(Image.open(io.BytesIO(store.get_blob(Keys.preview(job_id)) or b"")))
    init = prepare_image(png, SIZE, 3).permute(1, 2, 0).numpy()  # (H, W, C)
    for k in range(2):
        image = strip[:, k * SIZE:(k + 1) * SIZE]
        assert np.array_equal(image[:keep], init[:keep]), k
        assert (image[keep:] == 128).all(), k
    assert store.cancel(job_id) == "ok"
