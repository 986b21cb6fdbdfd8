"""`promptpix up` end to end: real launcher, redis-server, worker and API processes, real
HTTP; Ctrl-C must leave no process and no listening port behind."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.e2e.up_stack import UpStack, alive, descendants
from tests.worker.helpers import make_tiny_checkpoint, poll_job

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run_up(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "promptpix_cli", "up", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def up(tmp_path: Path, checkpoint: Path) -> Iterator[UpStack]:
    stack = UpStack(tmp_path, checkpoint)
    try:
        yield stack
    finally:
        stack.kill_all()


def test_up_serves_a_job_then_ctrl_c_stops_everything(up: UpStack) -> None:
    t0 = time.monotonic()
    up.wait_ready()
    started = descendants(up.proc.pid)
    commands = " | ".join(started.values())
    assert "redis-server" in commands and " worker" in commands and " serve" in commands, commands
    banner = up.log()
    assert f"{up.url}/docs" in banner and f"curl -s -X POST {up.url}/v1/generations" in banner
    ready_s = time.monotonic() - t0

    # The image's health checks pass against the real processes.
    for kind, port in (("api", up.port), ("worker", up.metrics_port)):
        check = subprocess.run([sys.executable, str(ROOT / "docker" / "healthcheck.py"), kind,
                                str(port)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"{kind}: {check.stdout}"

    with httpx.Client(base_url=up.url, timeout=10) as client:
        r = client.post("/v1/generations", json={"prompt": "a red square", "num_images": 2,
                                                 "seed": 7})
        assert r.status_code == 202, r.text
        job = poll_job(client, r.json()["id"], lambda j: j["status"] in
                       ("succeeded", "failed", "canceled"), timeout=60)
        assert job["status"] == "succeeded", job
        png = client.get(job["images"][1])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (8, 8)

    redis_port = int(re.search(r"redis-server on redis://127.0.0.1:(\d+)", banner).group(1))
    assert up.interrupt() == 0, up.log()
    left = up.wait_gone(list(started))
    assert not left, f"left running after Ctrl-C: {[started[p] for p in left]}"
    assert not _port_open(up.port) and not _port_open(redis_port)
    assert "promptpix up: stopped" in up.log()
    print(f"promptpix up ready in {ready_s:.1f} s; stopped {len(started)} processes")


def test_up_without_a_checkpoint_says_where_and_how(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PROMPTPIX_CHECKPOINT": str(tmp_path / "missing.pth")}
    res = _run_up(["--port", "1"], tmp_path, env)
    assert res.returncode == 1
    assert f"checkpoint not found: {tmp_path / 'missing.pth'}" in res.stdout


def test_up_names_the_demo_checkpoint_and_how_to_train_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.launcher as launcher

    # As on a checkout without the demo model: neither the working folder nor the
    # repository holds it.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launcher, "REPO_ROOT", tmp_path)
    monkeypatch.delenv("PROMPTPIX_CHECKPOINT", raising=False)
    with pytest.raises(launcher.LaunchError) as err:
        launcher.resolve_checkpoints(None)
    assert "checkpoints/demo/shapes16.pth" in str(err.value)
    assert "python train_llm_prompt.py --dataset shapes" in str(err.value)
    # ...and the shipped ones are found from the repository root: every demo model.
    monkeypatch.setattr(launcher, "REPO_ROOT", ROOT)
    found, demo = launcher.resolve_checkpoints(None)
    assert demo and (ROOT / launcher.DEMO_CHECKPOINT).resolve() in found
    assert sorted(p.name for p in found) == sorted(
        p.name for p in (ROOT / launcher.DEMO_DIR).glob("*.pth"))
    # Two checkpoints that would share a model name are refused up front.
    twin = tmp_path / "other" / "shapes16.pth"
    twin.parent.mkdir()
    twin.write_bytes(b"x")
    with pytest.raises(launcher.LaunchError, match="would all be model 'shapes16'"):
        launcher.model_names([ROOT / launcher.DEMO_CHECKPOINT, twin], {})


def test_up_refuses_a_busy_port(tmp_path: Path, checkpoint: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = _run_up(["--port", str(port), "--checkpoint", str(checkpoint)], tmp_path,
                      {"PATH": "/usr/bin:/bin"})
    assert res.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in res.stdout
    assert "redis" not in res.stdout  # it stopped before starting anything


def test_private_redis_has_a_password_and_a_terminal_ctrl_c_stops_it_last(up: UpStack) -> None:
    up.wait_ready()
    started = descendants(up.proc.pid)
    redis_pid = next(p for p, cmd in started.items() if "redis-server" in cmd)
    others = [p for p, cmd in started.items() if "promptpix_cli" in cmd]
    assert len(others) == 2, started  # the worker and the API
    url = up.redis_url()
    password = re.fullmatch(r"redis://:([^@]+)@127\.0\.0\.1:(\d+)/0", url).group(1)
    port = int(re.search(r"redis-server on redis://127.0.0.1:(\d+)", up.log()).group(1))
    assert len(password) >= 32
    # Not on any command line (what `ps` shows), not in the launcher's output.
    assert all(password not in cmd for cmd in started.values()), started
    assert password not in up.log()
    conf = Path(f"/proc/{redis_pid}/cwd").resolve() / "redis.conf"  # its `dir`
    assert conf.stat().st_mode & 0o077 == 0
    assert conf.parent.stat().st_mode & 0o077 == 0
    # Without the password, nobody can write jobs into it.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$1\r\ny\r\n")
        assert s.recv(100).startswith(b"-NOAUTH")

    # A terminal's Ctrl-C signals the launcher's whole process group at once.
    os.killpg(up.proc.pid, signal.SIGINT)
    gone_at: dict[int, float] = {}
    deadline = time.monotonic() + 60
    while len(gone_at) < len(started) and time.monotonic() < deadline:
        for pid in started:
            if pid not in gone_at and not alive(pid):
                gone_at[pid] = time.monotonic()
        time.sleep(0.005)
    assert up.proc.wait(30) == 0, up.log()
    assert set(gone_at) == set(started), up.log()
    last_user = max(gone_at[p] for p in others)
    assert gone_at[redis_pid] >= last_user, (
        f"Redis stopped {last_user - gone_at[redis_pid]:.3f} s before the API/worker")
    assert "Redis unreachable" not in up.log() and "Error 111" not in up.log(), up.log()
