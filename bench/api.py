"""API throughput and finish-to-visible delay against a local server (real Redis, uvicorn).

    python bench/api.py [--seconds 5] [--concurrency 16] [--workers 1] [--checkpoint PATH]

Prints status GETs/s, POSTs/s and the delay between a worker recording a job finished
and the API reporting it, then appends the figures to docs/benchmarks.md (--no-write to
skip). Without --checkpoint a tiny model is trained in a temp folder for the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
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


def _request(method: str, path: str, port: int) -> bytes:
    """One HTTP/1.1 keep-alive request, as bytes (the same bytes every time)."""
    body = json.dumps(BODY).encode() if method == "POST" else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


async def hammer(port: int, seconds: float, concurrency: int, method: str, path: str) -> float:
    """Requests per second answered 2xx by `concurrency` keep-alive connections.

    The client is a minimal asyncio HTTP/1.1 loop (write the request, read the head, read
    Content-Length bytes), not httpx: on this 2-core machine the client shares the cores
    with the server, and httpx's own per-request cost was about what the server's was, so
    it measured the client as much as the API.
    """
    count = errors = 0
    request = _request(method, path, port)
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal count, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                if head[9:10] == b"2":
                    count += 1
                else:
                    errors += 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    if errors:
        print(f"  ({errors} non-2xx answers)")
    return count / elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (Linux /proc)."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def measure(pid: int, port: int, seconds: float, concurrency: int, method: str,
            path: str) -> tuple[float, float]:
    """(requests/s, cores the server used meanwhile)."""
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    rate = asyncio.run(hammer(port, seconds, concurrency, method, path))
    return rate, (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)


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
            pid = api.proc.pid
            gets, get_cores = measure(pid, port, args.seconds, args.concurrency, "GET",
                                      f"/v1/generations/{job_id}")
            print(f"status GETs/s: {gets:.0f} (server used {get_cores:.2f} cores)")
            posts, post_cores = measure(pid, port, args.seconds, args.concurrency, "POST",
                                        "/v1/generations")
            print(f"POSTs/s:       {posts:.0f} (server used {post_cores:.2f} cores)")
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
        write_results(args, (gets, get_cores), (posts, post_cores), med, worst, len(delays))
    return 0


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def write_results(args: argparse.Namespace, gets: tuple[float, float],
                  posts: tuple[float, float], med: float, worst: float, n: int) -> None:
    """Replace the API section of docs/benchmarks.md (or append one)."""
    cmd = "python bench/api.py " + " ".join(sys.argv[1:])
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python "
               f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end")
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    text = f"""## API throughput (`bench/api.py`, {time.strftime('%Y-%m-%d')})

Command: `{cmd.strip()}`; machine: {machine}; client and server on the same cores;
{args.concurrency} concurrent keep-alive connections from a minimal asyncio HTTP/1.1
client, {args.workers} uvicorn process(es), {parser}, rate limit off, the polled job queued
(so each GET also reads its queue position).

| figure | result | server CPU | target |
|---|---|---|---|
| status GETs/s | {gets[0]:.0f} | {gets[1]:.2f} cores | >= 1000 |
| POSTs/s (validate + enqueue) | {posts[0]:.0f} | {posts[1]:.2f} cores | >= 300 |
| finish-to-visible delay | median {med:.1f} ms, max {worst:.1f} ms ({n} jobs) | | < 50 ms |
"""
    path = ROOT / "docs" / "benchmarks.md"
    doc = path.read_text(encoding="utf-8")
    head = "## API throughput"
    if head in doc:
        a = doc.index(head)
        b = doc.find("\n## ", a + len(head))
        doc = doc[:a] + text + (doc[b:] if b >= 0 else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc, encoding="utf-8")
    print(f"wrote the API section of {path}")


if __name__ == "__main__":
    sys.exit(main())
