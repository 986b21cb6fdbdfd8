"""Completion (`init_image` + `keep_rows`), `negative_prompt`, the `promptpix submit` flags
and scores of a generation's image, end to end: real Redis, a real worker with a tiny
trained model, a real uvicorn API, the real CLI."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.e2e.test_scores import SIZE, UPLOAD_LIMIT, poll
from tests.worker.helpers import (
    make_tiny_checkpoint,
    served,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.getbasetemp() / "tiny_complete.pth", steps=40)


@pytest.fixture(scope="module")
def stack(redis_server: Any, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[httpx.Client]:
    """The tiny model served, and a second model `other` declared (no worker) that is the
    default: requests for the tiny model name it."""
    with served(redis_server.url, checkpoint, tmp_path_factory.mktemp("complete"),
                PROMPTPIX_RATE_LIMIT="0",
                PROMPTPIX_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
                PROMPTPIX_MODELS=f"{checkpoint.stem},other",
                PROMPTPIX_DEFAULT_MODEL="other") as client:
        yield client


def noise_png(w: int = 10, h: int = 12, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def chw(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def test_completion_keeps_rows_exactly(stack: httpx.Client, checkpoint: Path) -> None:
    from model import load_checkpoint, prepare_image

    png = noise_png()
    init = prepare_image(png, SIZE, 3)  # what the worker makes of it (resized, cropped)
    model, _ = load_checkpoint(checkpoint, map_location="cpu")
    for extra in ({"top_k": 1}, {"temperature": 0.9, "guidance_scale": 2.0,
                                 "negative_prompt": "a blue square"}):
        body = {"prompt": "a red square", "num_images": 2, "seed": 3, "keep_rows": 3,
                "init_image": base64.b64encode(png).decode(), "model": checkpoint.stem,
                "best_of": 3, **extra}
        r = stack.post("/v1/generations", json=body)
        assert r.status_code == 202, r.text
        job = poll(stack, r.json()["status_url"])
        assert job["status"] == "succeeded", job
        assert job["keep_rows"] == 3 and job["has_init_image"] is True
        assert "init_image" not in job["params"] and job["params"]["keep_rows"] == 3
        images = torch.stack([chw(stack.get(u).content) for u in job["images"]])
        assert torch.equal(images[:, :, :3], init[:, :3].expand(2, -1, -1, -1)), extra
        # image_bits_per_dim counts the whole image under the prompt, kept rows included.
        with torch.no_grad():
            want = model.nll(images, ["a red square"] * 2).tolist()
        assert job["image_bits_per_dim"] == pytest.approx(want, abs=1e-4)
        # Scoring it without `model` runs on the model that made it (not the default).
        r = stack.post("/v1/scores", json={"job_id": job["id"], "image_index": 0,
                                           "captions": ["a red square"], "tolerance": 0})
        assert r.status_code == 202, r.text
        score = poll(stack, r.json()["status_url"])
        assert score["status"] == "succeeded" and score["model"]["id"] == checkpoint.stem
        assert score["results"][0]["bits_per_dim"] == pytest.approx(want[0], abs=1e-4)


def test_api_checks_completion_and_negative_prompt(stack: httpx.Client,
                                                   checkpoint: Path) -> None:
    def post(**kw: Any) -> httpx.Response:
        return stack.post("/v1/generations", json={"prompt": "a red square",
                                                   "model": checkpoint.stem, **kw})

    png = base64.b64encode(noise_png()).decode()
    for kw, field in (({"keep_rows": 2}, "init_image"), ({"init_image": png}, "keep_rows"),
                      ({"init_image": png, "keep_rows": SIZE}, "keep_rows"),
                      ({"init_image": png, "keep_rows": 0}, None),
                      ({"init_image": base64.b64encode(b"GIF89a..").decode(),
                        "keep_rows": 2}, "init_image"),
                      ({"init_image": "%%%", "keep_rows": 2}, "init_image"),
                      ({"negative_prompt": "x" * 1001}, "negative_prompt")):
        r = post(**kw)
        assert r.status_code == 422, (kw, r.text)
        if field is not None:
            assert r.json()["error"]["field"] == field, r.text
    assert "1..7" in post(init_image=png, keep_rows=SIZE).json()["error"]["message"]
    # The body limit of /v1/generations is PROMPTPIX_MAX_UPLOAD_BYTES (not 64 KiB) ...
    r = post(init_image=png, keep_rows=2, seed=1, pad="A" * 100_000)
    assert r.status_code == 422 and "pad" in r.text  # parsed: over 64 KiB was let in
    assert post(init_image="A" * (UPLOAD_LIMIT + 10), keep_rows=2).status_code == 413
    # ... and a score does not take `webhook` (score jobs send none): 422 naming it.
    r = stack.post("/v1/scores", json={"image": png, "captions": ["a"],
                                       "model": checkpoint.stem,
                                       "webhook": "https://example.com/h"})
    assert r.status_code == 422 and "webhook" in r.text, r.text


def test_cli_submit_completion_flags(stack: httpx.Client, checkpoint: Path,
                                     tmp_path: Path) -> None:
    from model import prepare_image

    png = tmp_path / "init.png"
    png.write_bytes(noise_png(seed=4))
    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "promptpix_cli", "submit", "a green square", "-n", "2",
         "--seed", "5", "--model", checkpoint.stem, "--init-image", str(png), "--keep-rows",
         "4", "--negative-prompt", "a red square", "--guidance-scale", "2", "--best-of", "3",
         "--wait", "--quiet", "--out", str(out), "--url", str(stack.base_url)],
        capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    paths = [Path(p) for p in run.stdout.split()]
    assert len(paths) == 2
    init = prepare_image(png.read_bytes(), SIZE, 3)
    for p in paths:
        assert torch.equal(chw(p.read_bytes())[:, :4], init[:, :4])
    job_id = paths[0].name.split("-")[0]
    job = stack.get(f"/v1/generations/{job_id}").json()
    assert job["params"]["negative_prompt"] == "a red square"
    assert job["params"]["best_of"] == 3 and job["keep_rows"] == 4
    bad = subprocess.run(
        [sys.executable, "-m", "promptpix_cli", "submit", "x", "--model", checkpoint.stem,
         "--init-image", str(png), "--keep-rows", str(SIZE), "--url", str(stack.base_url)],
        capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "keep_rows" in bad.stderr, bad.stderr
