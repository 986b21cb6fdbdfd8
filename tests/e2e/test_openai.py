"""The OpenAI-compatible images API, driven by the real `openai` SDK over real HTTP.

Real parts: uvicorn API, a `promptpix worker` on a tiny 16x16 model, a real Redis.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx
import openai
import pytest
from PIL import Image

from app.redis_server import free_port
from tests.e2e.api_stack import AUTH, KEY, Stack
from tests.worker.helpers import finished, poll_job, start_api, wait_for


@pytest.fixture
def stack(api_stack: Stack) -> Stack:
    return api_stack


def png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_models_list(stack: Stack) -> None:
    models = list(stack.client.models.list())
    assert [m.id for m in models] == ["tiny16"]
    m = models[0]
    assert m.object == "model" and m.owned_by == "promptpix" and isinstance(m.created, int)
    extra = m.model_extra or {}
    assert extra["image_size"] == 16 and extra["workers"] == 1
    assert len(extra["checksum"]) == 16 and extra["example_prompts"]


def test_b64_json_is_a_normal_job(stack: Stack) -> None:
    before = stack.job_ids()
    res = stack.client.images.generate(prompt="a red square", model="tiny16", n=2,
                                       quality="hd", style="vivid", user="alice",
                                       extra_body={"seed": 5, "temperature": 0.9})
    assert res.size == "16x16" and res.output_format == "png" and len(res.data) == 2
    imgs = [png(base64.b64decode(d.b64_json or "")) for d in res.data]
    assert [i.size for i in imgs] == [(16, 16)] * 2
    assert [i.text["seed"] for i in imgs] == ["5", "6"]
    assert [(d.model_extra or {})["seed"] for d in res.data] == [5, 6]
    assert all(d.revised_prompt is None for d in res.data)
    # Underneath: one ordinary job of this key, with `user` as a label (not its owner).
    (job_id,) = stack.job_ids() - before
    assert (res.model_extra or {})["id"] == job_id
    job = stack.job(job_id)
    assert job["status"] == "succeeded" and job["model"]["id"] == "tiny16"
    assert job["params"]["temperature"] == 0.9 and job["user"] == "alice"
    raw = stack.store.get(job_id)
    assert raw is not None and raw.user == "alice" and raw.owner == stack.owner()
    # The same bytes as the job's own PNG.
    assert stack.http.get(job["images"][1]).content == base64.b64decode(res.data[1].b64_json)


def test_alias_and_enlarged_size(stack: Stack) -> None:
    res = stack.client.images.generate(prompt="a blue square", model="dall-e-3",
                                       size="64x64", extra_body={"seed": 3})
    img = png(base64.b64decode(res.data[0].b64_json or ""))
    assert res.size == "64x64" and img.size == (64, 64) and img.text["seed"] == "3"
    # Nearest neighbour: each 4x4 block is one source pixel.
    small = png(base64.b64decode(stack.client.images.generate(
        prompt="a blue square", size="auto", extra_body={"seed": 3}).data[0].b64_json or ""))
    assert img.resize((16, 16), Image.Resampling.NEAREST).tobytes() == small.tobytes()


def test_errors_are_sdk_exceptions(stack: Stack) -> None:
    before = stack.job_ids()
    with pytest.raises(openai.BadRequestError) as e:
        stack.client.images.generate(prompt="x", size="1024x1536")
    assert e.value.code == "invalid_size" and e.value.param == "size"
    with pytest.raises(openai.BadRequestError) as e:
        stack.client.images.generate(prompt="x", size="100x100")
    assert '"16x16"' in e.value.message and e.value.code == "invalid_size"
    with pytest.raises(openai.NotFoundError) as e:
        stack.client.images.generate(prompt="x", model="gpt-image-1")
    assert e.value.code == "model_not_found" and "tiny16" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        stack.client.images.generate(prompt="x", n=99)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        stack.client.images.generate(prompt="x", extra_body={"temperature": 9})
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        stack.client.images.generate(prompt="x", extra_body={"sead": 1})
    assert e.value.param == "sead"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.base}/v1", api_key="wrong-key-123",
                      max_retries=0).images.generate(prompt="x")
    assert stack.job_ids() == before  # nothing was queued
    # OpenAI's error shape on this route; ours everywhere else.
    body = httpx.post(f"{stack.base}/v1/images/generations", json={}, headers=AUTH).json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert set(stack.http.post("/v1/generations", json={}).json()["error"]) >= {"code"}


def test_url_is_signed_and_expires(stack: Stack) -> None:
    res = stack.client.images.generate(prompt="a green square", response_format="url",
                                       size="32x32", extra_body={"seed": 9})
    url = res.data[0].url or ""
    assert url.startswith(stack.base + "/v1/images/files/")
    got = httpx.get(url)  # no API key
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert png(got.content).size == (32, 32) and png(got.content).text["seed"] == "9"
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}

    def with_query(**changes: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {**q, **changes}.items())
        return urlunsplit(parts._replace(query=query))

    assert httpx.get(with_query(sig="0" * 64)).status_code == 403
    assert httpx.get(with_query(scale="1")).status_code == 403  # signed for 2
    assert httpx.get(with_query(expires=str(int(q["expires"]) + 1000))).status_code == 403
    assert httpx.get(url.replace("/0.png", "/1.png")).status_code == 403
    # Signed, but expired: sign a URL in the past with the same secret.
    from app.jobwatch import URL_SECRET_KEY
    from app.openai_compat import signed_path

    secret = bytes(stack.store.r.get(URL_SECRET_KEY) or b"")
    job_id = parts.path.split("/")[4]
    old = signed_path(secret, job_id, 0, 2, 60, now=time.time() - 120)
    r = httpx.get(stack.base + old)
    assert r.status_code == 403 and r.json()["error"]["code"] == "url_expired"
    fresh = signed_path(secret, job_id, 0, 2, 60)
    assert httpx.get(stack.base + fresh).content == got.content
    assert httpx.get(stack.base + signed_path(secret, "0" * 32, 0, 1, 60)).status_code == 404


def test_stream_partial_images(stack: Stack) -> None:
    # A slow job (0.2 s a row) sampled in one batch with ours makes the rows arrive slowly:
    # it is queued behind a blocker, so the worker takes both when the blocker ends.
    blocker = stack.slow_job(0.05)
    poll_job(stack.http, blocker, lambda j: j["status"] == "running")
    slow = stack.slow_job(0.2)
    events = list(stack.client.images.generate(prompt="a red square", stream=True,
                                               partial_images=2, size="32x32",
                                               extra_body={"seed": 4}))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]  # type: ignore[union-attr]
    partial = png(base64.b64decode(events[0].b64_json))
    final = png(base64.b64decode(events[-1].b64_json))
    assert partial.size == final.size == (32, 32) and events[-1].size == "32x32"
    assert partial.getpixel((0, 31)) == (128, 128, 128)  # rows not sampled yet: grey
    assert final.text["seed"] == "4"
    assert stack.job(slow)["status"] == "succeeded"


def test_disconnect_cancels_and_timeout_is_504(stack: Stack, tmp_path: Path) -> None:
    blocker = stack.slow_job(0.2)  # ~3.2 s: ours waits behind it
    poll_job(stack.http, blocker, lambda j: j["status"] == "running")
    before = stack.job_ids()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.base}/v1/images/generations", json={"prompt": "a red square"},
                   headers=AUTH, timeout=httpx.Timeout(30, read=0.5))
    (gone,) = stack.job_ids() - before
    wait_for(lambda: stack.job(gone)["status"] == "canceled", 5, "the job to be canceled")
    # Closing a stream cancels its job too.
    before = stack.job_ids()
    with httpx.stream("POST", f"{stack.base}/v1/images/generations", headers=AUTH,
                      json={"prompt": "a red square", "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-")
        (streamed,) = wait_for(lambda: stack.job_ids() - before, 5, "the streamed job")
    wait_for(lambda: stack.job(streamed)["status"] == "canceled", 5, "the stream's job")
    # A second API with a 0.5 s limit: 504, not retried by the SDK, the job goes on.
    port = free_port()
    api = start_api(stack.redis.url, port, tmp_path / "api2.log", PROMPTPIX_API_KEYS=KEY,
                    PROMPTPIX_SYNC_TIMEOUT="0.5")
    try:
        stack.slow_job(0.1)
        before = stack.job_ids()
        with pytest.raises(openai.InternalServerError) as e:
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY,
                          max_retries=2).images.generate(prompt="a red square")
        assert e.value.status_code == 504 and e.value.response.headers["x-should-retry"] == "false"
        (job_id,) = stack.job_ids() - before  # no retry duplicated it
        assert job_id in e.value.message
        assert poll_job(stack.http, job_id, finished)["status"] == "succeeded"
    finally:
        api.stop()


def test_waiting_requests_hold_no_threads(stack: Stack) -> None:
    """More sync requests wait than the thread pool has threads (40), yet a route that
    needs a thread answers at once; the clients then give up and their jobs are canceled."""
    blocker = stack.slow_job(0.15)  # ~2.4 s: every request below waits behind it
    poll_job(stack.http, blocker, lambda j: j["status"] == "running")
    before = stack.job_ids()
    waiting = 48

    async def scenario() -> tuple[int, float, list[object]]:
        timeout = httpx.Timeout(30, read=3.0)
        async with httpx.AsyncClient(base_url=stack.base, headers=AUTH,
                                     timeout=timeout) as c:
            tasks = [asyncio.create_task(c.post("/v1/images/generations",
                                                json={"prompt": "a red square"}))
                     for _ in range(waiting)]
            await asyncio.sleep(1.5)
            t0 = time.monotonic()
            models = await c.get("/v1/models")  # a plain `def` route: runs in a thread
            took = time.monotonic() - t0
            results = await asyncio.gather(*tasks, return_exceptions=True)
        return models.status_code, took, results

    status, took, results = asyncio.run(scenario())
    assert status == 200 and took < 1.0, took
    new = stack.job_ids() - before
    assert len(new) == waiting
    timed_out = sum(isinstance(r, httpx.ReadTimeout) for r in results)
    assert timed_out > 0
    ends = [poll_job(stack.http, j, finished, timeout=30)["status"] for j in new]
    assert ends.count("canceled") >= timed_out - 2 and set(ends) <= {"canceled", "succeeded"}


def test_failed_job_is_500_without_retry(stack: Stack) -> None:
    import threading

    blocker = stack.slow_job(0.1)
    poll_job(stack.http, blocker, lambda j: j["status"] == "running")
    before = stack.job_ids()

    def cancel_ours() -> None:
        (job_id,) = wait_for(lambda: stack.job_ids() - before, 10, "our job")
        stack.http.delete(f"/v1/generations/{job_id}")

    t = threading.Thread(target=cancel_ours)
    t.start()
    with pytest.raises(openai.InternalServerError) as e:
        stack.client.images.generate(prompt="a red square")
    t.join()
    assert e.value.status_code == 500 and e.value.code == "canceled"
    assert e.value.response.headers["x-should-retry"] == "false"
    assert len(stack.job_ids() - before) == 1
