"""`promptpix submit` against a real stack (`promptpix up` with API keys on): PNGs on
success, the server's own message and a non-zero status on every kind of refusal or
failure."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from PIL import Image

from app import client
from app.deps import key_owner
from tests.e2e.up_stack import UpStack
from tests.worker.helpers import make_tiny_checkpoint, wait_for
from worker.protocol import GenerationParams, JobStore, Settings

API_KEY = "submit-test-key-0123"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpStack]:
    """One `promptpix up` for the module, with keys on and the worker's test hooks on."""
    workdir = tmp_path_factory.mktemp("submit")
    ckpt = make_tiny_checkpoint(workdir / "tiny.pth")
    up = UpStack(workdir, ckpt, PROMPTPIX_API_KEYS=API_KEY, PROMPTPIX_TEST_HOOKS="1")
    try:
        up.wait_ready()
        yield up
        assert up.interrupt() == 0, up.log()
    finally:
        up.kill_all()


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch, stack: UpStack) -> str:
    """The key and server reach the client through its environment variables."""
    monkeypatch.setenv("PROMPTPIX_API_KEY", API_KEY)
    monkeypatch.setenv("PROMPTPIX_URL", stack.url)
    return API_KEY


def store_for(stack: UpStack) -> JobStore:
    """The stack's Redis (the private, password-protected one `up` started)."""
    url = stack.redis_url()
    return JobStore(redis.Redis.from_url(url), Settings(redis_url=url), model="tiny")


def hooked_job(stack: UpStack, **hooks: float | bool) -> str:
    """A job the API cannot make: the worker's test hooks force a failure or slow rows."""
    params = GenerationParams(prompt="a red square", num_images=1, seed=3)
    job_id, _ = store_for(stack).create_job(params, owner=key_owner(API_KEY), test_hooks=hooks)
    return job_id


def test_submit_waits_and_writes_the_pngs(key: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = ["a red square", "--num-images", "3", "--seed", "1", "--temperature", "0.9",
            "--top-k", "50", "--top-p", "0.95", "--guidance-scale", "1.0", "--wait",
            "--out", str(tmp_path / "a")]
    assert client.main(args) == 0
    first = [Path(p) for p in capsys.readouterr().out.split()]
    assert len(first) == 3 and all(p.parent == tmp_path / "a" for p in first)
    for path in first:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == (8, 8)
    # The same seed and parameters give the same images (a new job, byte for byte).
    assert client.main([*args[:-1], str(tmp_path / "b"), "--quiet"]) == 0
    second = [Path(p) for p in capsys.readouterr().out.split()]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_submit_without_wait_prints_the_job(key: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert client.main(["a blue square", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    # An idle worker may take the job before the API reads it back.
    assert re.search(r'"status": "(queued|running)"', out) and '"seed": 5' in out


def test_refused_request_exits_1_with_the_servers_message(
        key: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert client.main(["a red square", "--temperature", "5", "--wait"]) == 1
    err = capsys.readouterr().err
    assert "invalid_request" in err and "(field: temperature)" in err


def test_missing_key_is_refused(stack: UpStack, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("PROMPTPIX_API_KEY", raising=False)
    assert client.main(["a red square", "--url", stack.url]) == 1
    assert "unauthorized" in capsys.readouterr().err


def test_unreachable_server(key: str, capsys: pytest.CaptureFixture[str]) -> None:
    from app.redis_server import free_port

    assert client.main(["x", "--url", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_failed_job_raises_the_servers_reason(stack: UpStack, key: str,
                                              tmp_path: Path) -> None:
    job_id = hooked_job(stack, oom=True)
    session = client.Session(stack.url, key)
    try:
        with pytest.raises(client.ClientError, match=r"failed: out_of_memory: "):
            client.wait_and_save(session, job_id, tmp_path, timeout=60, quiet=True)
    finally:
        session.close()
    assert not list(tmp_path.iterdir())


def test_canceled_job_is_reported(stack: UpStack, key: str, tmp_path: Path) -> None:
    job_id = hooked_job(stack, row_delay=0.3)  # 8 rows: about 2.4 s
    session = client.Session(stack.url, key)
    errors: list[Exception] = []

    def follow() -> None:
        try:
            client.wait_and_save(session, job_id, tmp_path, timeout=60, quiet=True)
        except client.ClientError as e:
            errors.append(e)

    follower = threading.Thread(target=follow)
    follower.start()
    try:
        wait_for(lambda: session.status(job_id)["status"] == "running", 30, "the job to run")
        assert session.cancel(job_id)["status"] == "canceled"
        follower.join(30)
    finally:
        session.close()
    assert errors and f"job {job_id} canceled" in str(errors[0])
