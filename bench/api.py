"""API throughput against a bare FastAPI + Redis app, side by side, and finish-to-visible.

    python bench/api.py [--seconds 5] [--concurrency 16] [--rounds 3] [--checkpoint PATH]

Starts one Redis, promptpix's API (one uvicorn process, rate limit and caller cap off) and
the bare app of `bench/api_bare.py` (its ceiling: FastAPI, uvicorn, the same Redis work),
then, `--rounds` times, drives each with the same load one after the other: status GETs of
a queued job, then POSTs of a generation. Each round gives promptpix/bare ratios (GET and
POST); the medians are the figures, absolute rates only describe this machine's state.
The load comes from `wrk -t1` when installed (Debian's `wrk`), else a minimal asyncio
client. Then a worker runs jobs for the delay between the worker recording a job finished
and the API showing it. Appends the figures, with the machine's load and copy bandwidth,
to docs/benchmarks.md (--no-write to skip). Without --checkpoint a tiny model is trained
in a temp folder for the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.redis_server import RedisServer, free_port  # noqa: E402
from tests.worker.helpers import (  # noqa: E402
    Proc,
    base_env,
    make_tiny_checkpoint,
    start_api,
    start_worker,
    wait_for,
    wait_worker_ready,
)
from worker.protocol import Settings  # noqa: E402

BODY = {"prompt": "a red square", "num_images": 1, "seed": 1}
MODEL = "tiny"  # the worker's checkpoint is tiny.pth; declared so POSTs resolve without it


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
        raise RuntimeError(f"{errors} non-2xx answers to {method} {path}")
    return count / elapsed


def wrk(port: int, seconds: float, concurrency: int, method: str, path: str) -> float:
    """Requests per second from `wrk -t1` (every answer must be 2xx)."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(f"wrk.method = {json.dumps(method)}\n"
                      + (f"wrk.body = {json.dumps(json.dumps(BODY))}\n"
                         'wrk.headers["Content-Type"] = "application/json"\n'
                         if method == "POST" else ""))
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "-s",
                              str(script), f"http://127.0.0.1:{port}{path}"],
                             capture_output=True, text=True, check=True).stdout
    finally:
        script.unlink()
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors on {method} {path}:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


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
    if shutil.which("wrk"):
        rate = wrk(port, seconds, concurrency, method, path)
    else:
        rate = asyncio.run(hammer(port, seconds, concurrency, method, path))
    return rate, (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)


def copy_bandwidth_gb_s(mib: int = 256) -> float:
    """GB/s of one in-memory copy of `mib` MiB (the machine's state, beside its load)."""
    src, dst = bytearray(b"x" * (mib << 20)), bytearray(mib << 20)
    best = 0.0
    for _ in range(4):  # the first pass also faults dst's pages in
        t0 = time.perf_counter()
        dst[:] = src
        best = max(best, len(src) / (time.perf_counter() - t0) / 1e9)
    return best


def start_bare(redis_url: str, port: int, log: Path) -> Proc:
    """`bench/api_bare.py` under uvicorn, as `promptpix serve` runs the API (one process)."""
    proc = Proc([sys.executable, "-m", "uvicorn", "bench.api_bare:create_app", "--factory",
                 "--port", str(port), "--log-level", "warning", "--no-access-log"],
                base_env(redis_url, BARE_REDIS_URL=redis_url), log)
    wait_for(lambda: _up(port, "/docs"), 30, "the bare app")
    return proc


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
    p.add_argument("--rounds", type=int, default=3, help="side-by-side repetitions")
    p.add_argument("--jobs", type=int, default=20, help="jobs for the finish-to-visible delay")
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="promptpix-bench-"))
    checkpoint = args.checkpoint or make_tiny_checkpoint(tmp / f"{MODEL}.pth")
    # The reaper at its default pace (start_api's is the tests' fast one): its sweep of
    # queued jobs grows with the backlog the POSTs leave.
    env = {"PROMPTPIX_RATE_LIMIT": "0", "PROMPTPIX_MAX_QUEUE": "100000000",
           "PROMPTPIX_MAX_QUEUED_PER_KEY": "0", "PROMPTPIX_MODELS": checkpoint.stem,
           "PROMPTPIX_REAPER_INTERVAL": str(Settings.model_fields["reaper_interval"].default)}
    load0, bandwidth = os.getloadavg()[0], copy_bandwidth_gb_s()
    print(f"load average {load0:.1f}, copy bandwidth {bandwidth:.1f} GB/s, client "
          f"{'wrk' if shutil.which('wrk') else 'asyncio'}")
    rounds: list[dict[str, float]] = []
    with RedisServer() as rs:
        port, bare_port = free_port(), free_port()
        api = start_api(rs.url, port, tmp / "api.log", **env)
        bare = start_bare(rs.url, bare_port, tmp / "bare.log")
        base = f"http://127.0.0.1:{port}"
        try:
            job_id = httpx.post(f"{base}/v1/generations", json=BODY).json()["id"]
            path = f"/v1/generations/{job_id}"
            for n in range(args.rounds):
                row: dict[str, float] = {}
                for method, url in (("GET", path), ("POST", "/v1/generations")):
                    for name, proc, p_ in (("promptpix", api, port), ("bare", bare, bare_port)):
                        rate, cores = measure(proc.proc.pid, p_, args.seconds,
                                              args.concurrency, method, url)
                        row[f"{name} {method}"], row[f"{name} {method} cores"] = rate, cores
                    row[f"{method} ratio"] = row[f"promptpix {method}"] / row[f"bare {method}"]
                print(f"round {n + 1}: GET {row['promptpix GET']:.0f}/s vs bare "
                      f"{row['bare GET']:.0f}/s = {row['GET ratio']:.2f}x; POST "
                      f"{row['promptpix POST']:.0f}/s vs bare {row['bare POST']:.0f}/s = "
                      f"{row['POST ratio']:.2f}x")
                rounds.append(row)
            bare.stop()
            import redis

            redis.Redis.from_url(rs.url).flushall()  # the backlog, so the worker starts idle
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
            bare.stop()
            api.stop()
    summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"median of {len(rounds)} rounds: GET {summary['GET ratio']:.2f}x of bare, "
          f"POST {summary['POST ratio']:.2f}x of bare")
    if not args.no_write:
        write_results(args, rounds, summary, (load0, os.getloadavg()[0], bandwidth),
                      med, worst, len(delays))
    return 0


def _up(port: int, path: str = "/healthz") -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def write_results(args: argparse.Namespace, rounds: list[dict[str, float]],
                  summary: dict[str, float], machine_state: tuple[float, float, float],
                  med: float, worst: float, n: int) -> None:
    """Replace the API section of docs/benchmarks.md (or append one)."""
    cmd = "python bench/api.py " + " ".join(sys.argv[1:])
    load0, load1, bandwidth = machine_state
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    client = "`wrk -t1`" if shutil.which("wrk") else "a minimal asyncio HTTP/1.1 client"
    lines = "\n".join(
        f"| {i + 1} | {r['promptpix GET']:.0f} / {r['bare GET']:.0f} | **{r['GET ratio']:.2f}x** "
        f"| {r['promptpix POST']:.0f} / {r['bare POST']:.0f} | **{r['POST ratio']:.2f}x** |"
        for i, r in enumerate(rounds))
    text = f"""## API throughput against a bare app (`bench/api.py`, {time.strftime('%Y-%m-%d')})

Command: `{cmd.strip()}`; machine: {platform.machine()}, {os.cpu_count()} cores, Python
{platform.python_version()}, {parser}; load average {load0:.1f} at the start, {load1:.1f} at
the end; one in-memory copy at {bandwidth:.1f} GB/s. Client: {client},
{args.concurrency} keep-alive connections, {args.seconds:g} s per figure, client and
servers on the same cores. promptpix runs one uvicorn process (rate limit and per-caller
cap off); the bare app (`bench/api_bare.py`) is FastAPI + `redis.asyncio` doing the same
Redis work and nothing else (GET: HGETALL of the same job hash; POST: job hash + RQ entry
in one MULTI). Each round measures the two apps one after the other, so a ratio compares
them under the same load; absolute rates only describe the machine at that moment.

| round | status GET/s promptpix / bare | GET ratio | POST/s promptpix / bare | POST ratio |
|---|---:|---:|---:|---:|
{lines}

Median of {len(rounds)} rounds: **status GET {summary['GET ratio']:.2f}x** the bare app (goal
>= 0.6x), **POST {summary['POST ratio']:.2f}x** (goal >= 0.5x). Server CPU (median): promptpix
{summary['promptpix GET cores']:.2f} / bare {summary['bare GET cores']:.2f} cores on GET,
{summary['promptpix POST cores']:.2f} / {summary['bare POST cores']:.2f} on POST.
Finish-to-visible (a worker records a job finished -> a GET shows it): median {med:.1f} ms,
max {worst:.1f} ms over {n} jobs (goal < 50 ms).
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
