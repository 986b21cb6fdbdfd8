"""Workers with a truncated or hostile checkpoint exit 2 with a clear message, run no code,
and `/readyz` stays 503 until a good worker arrives.

Missing and garbage files are covered in tests/e2e/test_serving_faults.py; pickles with code
refused by `load_checkpoint` in tests/model/test_core.py. These add the whole process.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from app.redis_server import RedisServer, free_port
from tests.worker.helpers import (
    ROOT,
    base_env,
    start_api,
    start_worker,
    wait_for,
    wait_worker_ready,
)


class Boom:
    """Unpickling this runs `touch <marker>` — if anything unpickles with code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_files(tmp: Path, good: Path) -> dict[str, Path]:
    marker = tmp / "pwned"
    data = good.read_bytes()
    files = {
        "truncated_half": data[: len(data) // 2],
        "truncated_tail": data[:-100],
        "empty": b"",
        "zeros": b"\0" * 4096,
    }
    out = {name: tmp / f"{name}.pth" for name in files}
    for name, content in files.items():
        out[name].write_bytes(content)
    # torch.save of a dict whose tensor slot is an object with __reduce__ (the zip format)
    torch.save({"format_version": 1, "config": {}, "state_dict": Boom(marker)},
               tmp / "hostile_torch.pth")
    out["hostile_torch"] = tmp / "hostile_torch.pth"
    with open(tmp / "hostile_pickle.pth", "wb") as f:  # a plain pickle (the legacy format)
        pickle.dump(Boom(marker), f)
    out["hostile_pickle"] = tmp / "hostile_pickle.pth"
    (tmp / "a_dir.pth").mkdir()
    out["directory"] = tmp / "a_dir.pth"
    return out


def _run_worker(path: Path,
                redis_url: str = "redis://127.0.0.1:1/0") -> subprocess.CompletedProcess:
    env = base_env(redis_url, PROMPTPIX_CHECKPOINT=str(path), PROMPTPIX_DEVICE="cpu")
    return subprocess.run([sys.executable, "-m", "worker.runtime"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _check_refused(out: subprocess.CompletedProcess, path: Path, marker: Path) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "checkpoint" in out.stderr and str(path) in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not marker.exists(), "a hostile checkpoint ran code"


def test_hostile_checkpoint_refused_and_not_ready_until_good_worker(
        tmp_path: Path, tiny_checkpoint: Path) -> None:
    files = _bad_files(tmp_path, tiny_checkpoint)
    rs = RedisServer().start()
    port = free_port()
    # The model is declared: its jobs are accepted before any worker has loaded it.
    api = start_api(rs.url, port, tmp_path / "api.log", PROMPTPIX_MODELS=tiny_checkpoint.stem)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    good = None
    try:
        for name in ("hostile_torch", "truncated_half"):
            _check_refused(_run_worker(files[name], rs.url), files[name], tmp_path / "pwned")
            r = http.get("/readyz")
            assert r.status_code == 503 and "worker" in r.json()["error"]["message"]
        # Accepted while no worker is alive; served once a good one comes.
        job = http.post("/v1/generations", json={"prompt": "a red square"}).json()["id"]
        good = start_worker(rs.url, tiny_checkpoint, tmp_path / "good.log")
        wait_worker_ready(rs.url, good)
        wait_for(lambda: http.get("/readyz").status_code == 200, 10, "/readyz 200")
        wait_for(lambda: http.get(f"/v1/generations/{job}").json()["status"] == "succeeded",
                 60, "the waiting job to run")
    finally:
        if good is not None:
            good.stop()
        http.close()
        api.stop()
        rs.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["truncated_tail", "empty", "zeros", "hostile_pickle",
                                  "directory"])
def test_every_bad_checkpoint_is_refused(tmp_path: Path, tiny_checkpoint: Path,
                                         name: str) -> None:
    path = _bad_files(tmp_path, tiny_checkpoint)[name]
    _check_refused(_run_worker(path), path, tmp_path / "pwned")
