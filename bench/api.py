"""API throughput and finish-to-visible delay against a local server (real Redis, uvicorn).

    python bench/api.py [--seconds 5] [--concurrency 16] [--workers 1] [--checkpoint PATH]

Prints status GETs/s, POSTs/s and the delay between a worker recording a job finished
and the API reporting it, then appends the figures to docs/benchmarks.md (--no-write to
skip). Without --checkpoint a tiny model is trained in a temp folder for the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.redis_server import RedisServer, free_port  # noqa: E402
from tests.worker.helpers import (  # noqa: E402
    make_tiny_checkpoint,
    start_api,
    start_worker,
    wait_worker_ready,
)

BODY = {"prompt": "a red square", "num_images": 1, "seed": 1}


async def hammer(base: str, seconds: float, concurrency: int, method: str, path: str) -> float:
    """Requests per second answered 2xx by `concurrency` keep-alive clients."""
    count = 0
    errors = 0
    deadline = time.perf_counter() + seconds

    async def loop(client: httpx.AsyncClient) -> None:
        nonlocal count, errors
        while time.perf_counter() < deadline:
            if method == "GET":
                r = await client.get(path)
            else:
                r = await client.post(path, json=BODY)
            if r.status_code < 300:
                count += 1
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        start = time.perf_counter()
        await asyncio.gather(*(loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    if errors:
        print(f"  ({errors} non-2xx answers)")
    return count / elapsed


def finish_to_visible(base: str, jobs: int) -> list[float]:
    """Per job: seconds from the worker's finished_at to the first GET that shows it."""
    from datetime import datetime

    delays = []
    with httpx.Client(base_url=base, timeout=10) as c:
        for i in range(jobs):
            job_id = c.post("/v1/generations", json={**BODY, "seed": i}).json()["id"]
            while True:
                job = c.get(f"/v1/generations/{job_id}").json()
                if job["status"] in ("succeeded", "failed"):
                    seen = time.time()
                    break
            done = datetime.fromisoformat(job["finished_at"].replace("Z", "+00:00")).timestamp()
            delays.append(seen - done)
    return delays


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="uvicorn processes")
    p.add_argument("--jobs", type=int, default=20, help="jobs for the finish-to-visible delay")
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="promptpix-bench-"))
    checkpoint = args.checkpoint or make_tiny_checkpoint(tmp / "tiny.pth")
    env = {"PROMPTPIX_RATE_LIMIT": "0", "PROMPTPIX_MAX_QUEUE": "1000000"}
    with RedisServer() as rs:
        port = free_port()
        api = start_api(rs.url, port, tmp / "api.log", **env)
        if args.workers > 1:
            api.stop()
            from tests.worker.helpers import Proc, base_env, wait_for

            api = Proc([sys.executable, "-m", "app.serve", "--port", str(port), "--workers",
                        str(args.workers), "--log-level", "warning", "--no-access-log"],
                       base_env(rs.url, **env), tmp / "api.log")
            wait_for(lambda: _up(port), 30, "API")
        base = f"http://127.0.0.1:{port}"
        try:
            job_id = httpx.post(f"{base}/v1/generations", json=BODY).json()["id"]
            gets = asyncio.run(hammer(base, args.seconds, args.concurrency, "GET",
                                      f"/v1/generations/{job_id}"))
            print(f"status GETs/s: {gets:.0f}")
            posts = asyncio.run(hammer(base, args.seconds, args.concurrency, "POST",
                                       "/v1/generations"))
            print(f"POSTs/s:       {posts:.0f}")
            import redis

            redis.Redis.from_url(rs.url).delete("rq:queue:generate")  # drop the backlog
            worker = start_worker(rs.url, checkpoint, tmp / "worker.log")
            try:
                wait_worker_ready(rs.url, worker)
                delays = finish_to_visible(base, args.jobs)
            finally:
                worker.stop()
            med, worst = statistics.median(delays) * 1000, max(delays) * 1000
            print(f"finish-to-visible: median {med:.1f} ms, max {worst:.1f} ms "
                  f"over {len(delays)} jobs")
        finally:
            api.stop()
    if not args.no_write:
        write_results(args, gets, posts, med, worst, len(delays))
    return 0


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def write_results(args: argparse.Namespace, gets: float, posts: float, med: float,
                  worst: float, n: int) -> None:
    """Append a section to docs/benchmarks.md."""
    cmd = "python bench/api.py " + " ".join(sys.argv[1:])
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python "
               f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end "
               "(other engineers' jobs share the cores)")
    text = f"""
## API throughput (`bench/api.py`, {time.strftime('%Y-%m-%d')})

Command: `{cmd.strip()}`; machine: {machine}; client and server on the same cores;
{args.concurrency} concurrent keep-alive clients, {args.workers} uvicorn process(es), h11.

| figure | result | target |
|---|---|---|
| status GETs/s | {gets:.0f} | >= 1000 |
| POSTs/s (validate + enqueue) | {posts:.0f} | >= 300 |
| finish-to-visible delay | median {med:.1f} ms, max {worst:.1f} ms ({n} jobs) | < 50 ms |
"""
    path = ROOT / "docs" / "benchmarks.md"
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
    print(f"appended to {path}")


if __name__ == "__main__":
    sys.exit(main())
