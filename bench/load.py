"""Bounded load test: N concurrent clients submit and poll for D seconds (asyncio + httpx).

Starts its own private Redis, the real API (`promptpix serve`) and W real workers with a
tiny model unless --url points at a running server. Each client loops: POST a job, poll it
until it ends, repeat. After the duration no new jobs are sent and every accepted job is
followed until it ends (or --drain seconds pass). Reports submitted, completed, failed,
lost (accepted and then 404: must be 0), unfinished, the 429s, p50/p99 submit latency,
p50/p99 end-to-end job time (client-observed, poll every --poll s), and the API's CPU
(from /proc, when the API is ours).

    python bench/load.py --clients 50 --duration 120               # the full run
    python bench/load.py --clients 10 --duration 15                # a smoke run
    python bench/load.py --clients 20 --duration 20 --max-queue 5  # 429 queue_full appear
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Tally:
    submit_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    codes: dict[int, int] = field(default_factory=dict)
    accepted: dict[str, float] = field(default_factory=dict)  # job id -> submit time
    ended: dict[str, str] = field(default_factory=dict)  # job id -> final status
    lost: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


async def follow(http: httpx.AsyncClient, t: Tally, job_id: str, poll: float,
                 until: float) -> None:
    """Poll one job until it ends, is lost (404) or `until` passes."""
    while time.monotonic() < until:
        try:
            r = await http.get(f"/v1/generations/{job_id}")
        except httpx.HTTPError as e:
            t.errors.append(f"poll: {e!r}")
            await asyncio.sleep(poll)
            continue
        t.codes[r.status_code] = t.codes.get(r.status_code, 0) + 1
        if r.status_code == 404:
            t.lost.add(job_id)
            return
        if r.status_code == 200 and r.json()["status"] in ("succeeded", "failed", "canceled"):
            t.ended[job_id] = r.json()["status"]
            t.e2e_s.append(time.monotonic() - t.accepted[job_id])
            return
        await asyncio.sleep(poll)


async def client(http: httpx.AsyncClient, t: Tally, n: int, stop_at: float, drain_until: float,
                 poll: float) -> None:
    k = 0
    while time.monotonic() < stop_at:
        k += 1
        body = {"prompt": "a red square", "seed": n * 1_000_000 + k}
        t0 = time.monotonic()
        try:
            r = await http.post("/v1/generations", json=body)
        except httpx.HTTPError as e:
            t.errors.append(f"submit: {e!r}")
            await asyncio.sleep(poll)
            continue
        t.submit_s.append(time.monotonic() - t0)
        t.codes[r.status_code] = t.codes.get(r.status_code, 0) + 1
        if r.status_code == 202:
            t.accepted[r.json()["id"]] = t0
            await follow(http, t, r.json()["id"], poll, drain_until)
        elif r.status_code == 429:
            await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), 1.0))
        else:
            t.errors.append(f"submit answered {r.status_code}: {r.text[:200]}")
            await asyncio.sleep(poll)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children) from /proc, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


async def run(url: str, clients: int, duration: float, drain: float, poll: float,
              api_pid: int | None) -> dict:
    t = Tally()
    limits = httpx.Limits(max_connections=clients + 5)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        cpu0, wall0 = (cpu_seconds(api_pid) if api_pid else 0.0), time.monotonic()
        stop_at = wall0 + duration
        await asyncio.gather(*(client(http, t, n, stop_at, stop_at + drain, poll)
                               for n in range(clients)))
        wall = time.monotonic() - wall0
        cpu = (cpu_seconds(api_pid) - cpu0) if api_pid else None
    unfinished = set(t.accepted) - set(t.ended) - t.lost
    statuses = list(t.ended.values())
    return {
        "clients": clients, "duration_s": duration, "wall_s": round(wall, 1),
        "submitted": len(t.accepted), "completed": statuses.count("succeeded"),
        "failed": statuses.count("failed"), "lost": len(t.lost), "unfinished": len(unfinished),
        "http_codes": dict(sorted(t.codes.items())),
        "queue_full_429": t.codes.get(429, 0), "client_errors": len(t.errors),
        "first_errors": t.errors[:3],
        "submit_latency_s": {"p50": pct(t.submit_s, 0.5), "p99": pct(t.submit_s, 0.99)},
        "end_to_end_s": {"p50": pct(t.e2e_s, 0.5), "p99": pct(t.e2e_s, 0.99),
                         "mean": round(statistics.fmean(t.e2e_s), 3) if t.e2e_s else None},
        "jobs_per_s": round(len(t.e2e_s) / wall, 2) if wall else None,
        "api_cpu_cores": round(cpu / wall, 3) if cpu is not None else None,
        "api_cpu_s": round(cpu, 2) if cpu is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of submissions")
    p.add_argument("--drain", type=float, default=120.0,
                   help="seconds to follow accepted jobs after the duration")
    p.add_argument("--poll", type=float, default=0.2, help="poll interval of each client")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-queue", type=int, default=None, help="PROMPTPIX_MAX_QUEUE of our API")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="model for our workers (default: a tiny one trained here)")
    p.add_argument("--url", default=None, help="a running server instead of starting one")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    if args.url:
        figures = asyncio.run(run(args.url, args.clients, args.duration, args.drain,
                                  args.poll, None))
    else:
        figures = run_local(args)
    figures["command"] = "python bench/load.py " + " ".join(argv or sys.argv[1:])
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    ok = figures["lost"] == 0 and figures["client_errors"] == 0 and not any(
        c >= 500 for c in figures["http_codes"])
    return 0 if ok else 1


def run_local(args: argparse.Namespace) -> dict:
    """Our own Redis + API + workers (the test suite's real-process helpers)."""
    from app.redis_server import RedisServer, free_port
    from tests.worker.helpers import (
        live_worker_names,
        make_tiny_checkpoint,
        start_api,
        start_worker,
        wait_worker_ready,
    )

    tmp = Path(tempfile.mkdtemp(prefix="promptpix-load-"))
    checkpoint = args.checkpoint or make_tiny_checkpoint(tmp / "tiny.pth")
    rs = RedisServer().start()
    port = free_port()
    env = {"PROMPTPIX_RATE_LIMIT": "0"}  # every client shares 127.0.0.1's bucket otherwise
    if args.max_queue is not None:
        env["PROMPTPIX_MAX_QUEUE"] = str(args.max_queue)
    api = start_api(rs.url, port, tmp / "api.log", **env)
    workers = []
    try:
        for i in range(args.workers):
            before = live_worker_names(rs.url)
            w = start_worker(rs.url, checkpoint, tmp / f"worker{i}.log")
            workers.append(w)
            wait_worker_ready(rs.url, w, before=before)
        figures = asyncio.run(run(f"http://127.0.0.1:{port}", args.clients, args.duration,
                                  args.drain, args.poll, api.proc.pid))
        figures["workers"] = args.workers
        figures["max_queue"] = args.max_queue or 1000
        figures["api_unhandled_errors"] = api.log().count("unhandled error")
        figures["workers_alive_at_end"] = sum(w.alive() for w in workers)
        figures["logs"] = str(tmp)
        return figures
    finally:
        for w in workers:
            w.stop()
        api.stop()
        rs.cleanup()


if __name__ == "__main__":
    sys.exit(main())
