"""Real parts for serving tests: a tiny trained checkpoint, worker and API subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from app.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ["a red square", "a blue square", "a green square", "a white square"]
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60),
           "white": (240, 240, 240)}
# Liveness shortened so a lost worker is noticed in ~2 s instead of ~20 s.
FAST_LIVENESS = {"PROMPTPIX_HEARTBEAT_INTERVAL": "0.5", "PROMPTPIX_REAPER_INTERVAL": "0.5"}


def make_tiny_checkpoint(path: Path, steps: int = 20, image_size: int = 8) -> Path:
    """Train a tiny text-conditioned model for a few steps on flat colour squares; save it.

    Reused when `path` exists (several test modules share one per session)."""
    if path.exists():
        return path
    import torch

    from model import ModelConfig, PromptPix, bits_per_dim, save_checkpoint
    from model.tokenizers import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer("word", CAPTIONS, vocab_size=1000)
    cfg = ModelConfig(image_size=image_size, channels=3, hidden_dim=32, num_layers=2,
                      num_heads=2, text_embed_dim=32, num_text_layers=1, text_nhead=2,
                      max_text_length=32, vocab_size=len(tok))
    m = PromptPix(cfg, tokenizer=tok)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    images = torch.stack([
        torch.tensor(COLOURS[c.split()[1]], dtype=torch.uint8)[:, None, None]
        .expand(3, image_size, image_size) for c in CAPTIONS])
    m.train()
    for _ in range(steps):
        ids, mask = m.tokenize(CAPTIONS)
        loss = bits_per_dim(m(images, ids, mask, None), images).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    save_checkpoint(path, m, meta={"dataset": "squares", "steps": steps,
                                   "example_prompts": CAPTIONS[:2],
                                   "default_guidance_scale": 1.0,
                                   "val_bpd": float(loss.detach())})
    return path


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll `cond` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def base_env(redis_url: str, **extra: str) -> dict[str, str]:
    """Environment of a service subprocess: this repo, the test Redis, quiet threads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTPIX_")}
    env.update({"PROMPTPIX_REDIS_URL": redis_url, "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


class Proc:
    """A service subprocess with its log file; `stop()` is idempotent."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def start_worker(redis_url: str, checkpoint: Path, log: Path, **env: str) -> Proc:
    """A real `promptpix worker` process (test hooks on, fast liveness, metrics port auto)."""
    e = base_env(redis_url, PROMPTPIX_CHECKPOINT=str(checkpoint), PROMPTPIX_TEST_HOOKS="1",
                 PROMPTPIX_WORKER_METRICS_PORT="0", PROMPTPIX_DEVICE="cpu",
                 **FAST_LIVENESS)
    e.update(env)
    return Proc([sys.executable, "-m", "worker.runtime"], e, log)


def live_worker_names(redis_url: str) -> set[str]:
    """Names of workers with a live heartbeat and a model."""
    import redis

    from worker.protocol import JobStore, Settings

    store = JobStore(redis.Redis.from_url(redis_url), Settings(redis_url=redis_url))
    return {w["name"] for w in store.live_workers() if w.get("model_id")}


def wait_worker_ready(redis_url: str, proc: Proc, before: set[str] | None = None,
                      timeout: float = 90.0) -> str:
    """Wait until a new live worker appears; return its name."""
    before = before or set()

    def ready() -> str | None:
        if not proc.alive():
            raise AssertionError(f"worker exited early:\n{proc.log()[-3000:]}")
        new = live_worker_names(redis_url) - before
        return next(iter(new)) if new else None

    return str(wait_for(ready, timeout, "a worker heartbeat", every=0.2))


def start_api(redis_url: str, port: int, log: Path, log_level: str = "warning",
              access_log: bool = False, **env: str) -> Proc:
    """A real `promptpix serve` (uvicorn) process on 127.0.0.1:`port`, ready to answer."""
    e = base_env(redis_url, **FAST_LIVENESS)
    e.update(env)
    proc = Proc([sys.executable, "-m", "app.serve", "--port", str(port), "--log-level",
                 log_level, *([] if access_log else ["--no-access-log"])], e, log)

    def up() -> bool:
        if not proc.alive():
            raise AssertionError(f"API exited early:\n{proc.log()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 30, "the API to answer /healthz", every=0.1)
    return proc


def poll_job(client: httpx.Client, job_id: str, until: Callable[[dict[str, Any]], bool],
             timeout: float = 60.0, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """GET the job until `until(job)`; return that job."""
    def check() -> dict[str, Any] | None:
        r = client.get(f"/v1/generations/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        job = r.json()
        return job if until(job) else None

    return dict(wait_for(check, timeout, f"job {job_id} condition", every=0.05))


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "canceled")


@contextmanager
def served(redis_url: str, checkpoint: Path, tmp: Path, **api_env: str
           ) -> Iterator[httpx.Client]:
    """One worker serving `checkpoint` and one API (`api_env` added to its environment)
    over an emptied Redis; a client of that API. Both processes stop on exit."""
    import redis

    redis.Redis.from_url(redis_url).flushall()
    worker = start_worker(redis_url, checkpoint, tmp / "worker.log")
    procs: list[Proc] = [worker]
    try:
        wait_worker_ready(redis_url, worker)
        port = free_port()
        procs.append(start_api(redis_url, port, tmp / "api.log", **api_env))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        for p in procs:
            p.stop()
