"""Capacity model: how many workers keep the queue wait under a target at a given load.

A discrete-event simulation of one model's queue (FIFO, as RQ serves `generate:<model>`)
with c identical workers. A free worker takes the oldest queued job and, with batching,
every other queued job up to `--max-batch` (as the worker's batch sampler does); a batch of
k one-image jobs takes k * s / speedup(k), s the measured sampling time of one image at
batch 1. Arrivals are Poisson at a rate, or a replayed trace (JSON: a list of submission
offsets in seconds, or a `measure` report's `arrivals_s`).

    # sizing table from a per-image time (given, or read from a worker's /metrics)
    python bench/capacity.py table --service-time 0.35 --rates 1 2 4 8 --workers 1-16
    python bench/capacity.py table --metrics-url http://worker:9100/metrics --rates 2 4
    # check the model against a real run here: Redis + API + 2 real workers, one Poisson
    # trace submitted open-loop, measured waits beside the simulated waits of that trace
    nice -n 10 python bench/capacity.py measure --rate 3 --duration 60 --workers 2

Wait = a job's start of sampling minus its submission (`started_at - created_at`, the
worker's promptpix_queue_wait_seconds); the client's end-to-end time adds sampling.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import heapq
import itertools
import json
import math
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Measured batching speed-up of the CPU sampler (docs/benchmarks.md, "Batching across
# jobs", 2026-11-29: 8 jobs in one batch = 2.89x the images/s of one at a time).
CPU_BATCH_SPEEDUP = {1: 1.0, 8: 2.89}


# --------------------------------------------------------------------------- arrivals

def poisson_arrivals(rate: float, duration: float, seed: int = 0) -> list[float]:
    """Submission times (s) of a Poisson process of `rate` jobs/s over `duration` s."""
    if rate <= 0 or duration <= 0:
        raise ValueError(f"rate and duration must be > 0, got rate={rate} duration={duration}")
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append(t)


def load_trace(path: Path) -> list[float]:
    """A trace file: a JSON list of offsets (s), or an object with `arrivals_s`."""
    data = json.loads(path.read_text())
    arrivals = data["arrivals_s"] if isinstance(data, dict) else data
    if not arrivals or not all(isinstance(a, (int, float)) for a in arrivals):
        raise ValueError(f"{path}: expected a non-empty list of seconds, "
                         "or {'arrivals_s': [...]}")
    return sorted(float(a) for a in arrivals)


# --------------------------------------------------------------------------- service

def speedup_at(k: int, points: dict[int, float]) -> float:
    """Batch speed-up at batch size k, linear between the measured points (flat outside)."""
    xs = sorted(points)
    if k <= xs[0]:
        return points[xs[0]]
    if k >= xs[-1]:
        return points[xs[-1]]
    i = bisect.bisect_left(xs, k)
    x0, x1 = xs[i - 1], xs[i]
    return points[x0] + (points[x1] - points[x0]) * (k - x0) / (x1 - x0)


@dataclass
class Service:
    """Time a worker spends on a batch of k one-image jobs: k * per_image / speedup(k) +
    overhead, where per_image is fixed (`fixed`), exponential with that mean (`exp`, for the
    closed forms), drawn from measured samples (`empirical`), or the measured samples in
    order, job i taking sample i (`replay`: keeps slow spells together), and overhead is the
    worker's time per batch outside sampling (taking the job, storing the PNGs)."""

    per_image: float
    kind: str = "fixed"
    samples: Sequence[float] = ()
    speedup: dict[int, float] | None = None
    seed: int = 1
    overhead: float = 0.0  # per batch, outside sampling: dequeue, result storage, bookkeeping

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "exp", "empirical", "replay"):
            raise ValueError("service kind must be fixed, exp, empirical or replay, "
                             f"got {self.kind!r}")
        if self.kind in ("empirical", "replay") and not self.samples:
            raise ValueError("an empirical service needs measured samples")
        if self.per_image <= 0:
            raise ValueError(f"per-image service time must be > 0 s, got {self.per_image}")
        self._rng = random.Random(self.seed)
        self._next = 0

    def batch_time(self, k: int) -> float:
        if self.kind == "exp":
            one = self._rng.expovariate(1.0 / self.per_image)
        elif self.kind == "empirical":
            one = self._rng.choice(self.samples)
        elif self.kind == "replay":  # the measured times in job order (FIFO: start order)
            took = sum(self.samples[(self._next + i) % len(self.samples)] for i in range(k))
            self._next += k
            return took / speedup_at(k, self.speedup or {1: 1.0}) + self.overhead
        else:
            one = self.per_image
        return k * one / speedup_at(k, self.speedup or {1: 1.0}) + self.overhead


# --------------------------------------------------------------------------- simulation

@dataclass
class SimResult:
    waits: list[float]
    utilisation: float
    batches: int

    def summary(self) -> dict[str, float]:
        return {"p50": pct(self.waits, 0.50), "p95": pct(self.waits, 0.95),
                "p99": pct(self.waits, 0.99), "mean": statistics.fmean(self.waits),
                "utilisation": self.utilisation,
                "mean_batch": len(self.waits) / self.batches if self.batches else 0.0}


def simulate(arrivals: Sequence[float], workers: int, service: Service,
             max_batch: int = 1) -> SimResult:
    """FIFO queue, `workers` identical servers, batches of up to `max_batch` queued jobs."""
    if workers < 1 or max_batch < 1:
        raise ValueError(f"workers and max_batch must be >= 1, got {workers}, {max_batch}")
    a = sorted(arrivals)
    free = [a[0] if a else 0.0] * workers  # when each worker is next free
    heapq.heapify(free)
    waits, busy, batches, i, end = [], 0.0, 0, 0, 0.0
    while i < len(a):
        start = max(heapq.heappop(free), a[i])
        j = i
        while j < len(a) and j - i < max_batch and a[j] <= start:
            j += 1
        took = service.batch_time(j - i)
        waits.extend(start - a[k] for k in range(i, j))
        busy += took
        batches += 1
        end = max(end, start + took)
        heapq.heappush(free, start + took)
        i = j
    span = (end - a[0]) if a else 0.0
    return SimResult(waits, busy / (workers * span) if span > 0 else 0.0, batches)


def pct(xs: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of xs."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] if s else float("nan")


# --------------------------------------------------------------------------- closed forms

def erlang_c(lam: float, mu: float, c: int) -> float:
    """P(a job waits) in M/M/c (Erlang C)."""
    a = lam / mu
    rho = a / c
    if rho >= 1:
        return 1.0
    top = a ** c / math.factorial(c) / (1 - rho)
    return top / (sum(a ** k / math.factorial(k) for k in range(c)) + top)


def mmc_mean_wait(lam: float, mu: float, c: int) -> float:
    """Mean queue wait of M/M/c: C(c, a) / (c mu - lam) (M/M/1: rho / (mu - lam))."""
    return erlang_c(lam, mu, c) / (c * mu - lam)


def mmc_wait_quantile(lam: float, mu: float, c: int, q: float) -> float:
    """The q-quantile of the M/M/c wait: P(W > t) = C exp(-(c mu - lam) t)."""
    pw = erlang_c(lam, mu, c)
    return 0.0 if pw <= 1 - q else math.log(pw / (1 - q)) / (c * mu - lam)


# --------------------------------------------------------------------------- metrics

def per_image_from_metrics(text: str) -> float:
    """Seconds of sampling per image from a worker's /metrics (Prometheus text):
    promptpix_generation_seconds_sum / promptpix_images_generated_total."""
    def value(name: str) -> float:
        m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.MULTILINE)
        if not m:
            raise ValueError(f"/metrics has no {name}: is this a promptpix worker's endpoint?")
        return float(m.group(1))

    images = value("promptpix_images_generated_total")
    if images <= 0:
        raise ValueError("the worker has generated no image yet: no sampling time to read")
    return value("promptpix_generation_seconds_sum") / images


def fetch_metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


# --------------------------------------------------------------------------- table

def parse_range(spec: str) -> list[int]:
    """'1-16' or '1,2,4,8' -> list of ints."""
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    if not out or min(out) < 1:
        raise ValueError(f"workers must be a range like 1-16 or 1,2,4 of ints >= 1, got {spec!r}")
    return out


def table(per_image: float, rates: Sequence[float], workers: Sequence[int], max_batch: int,
          speedup: dict[int, float], duration: float, target_p95: float, seed: int = 0,
          overhead: float = 0.0, out: Callable[[str], None] = print) -> list[dict]:
    """Print p50/p95/p99 wait and utilisation for each rate and worker count; return rows
    (with the smallest count meeting the p95 target marked)."""
    rows = []
    out(f"per-image sampling time {per_image:.3f} s + {overhead:.3f} s a batch outside "
        f"sampling, max batch {max_batch}, "
        f"speed-up {speedup}, Poisson arrivals over {duration:.0f} s (seed {seed})")
    out(f"{'rate/s':>7} {'c':>3} {'p50 s':>8} {'p95 s':>8} {'p99 s':>8} {'util':>6}")
    for rate in rates:
        arrivals = poisson_arrivals(rate, duration, seed)
        best = None
        for c in workers:
            capacity = c * max_batch / (max_batch * per_image / speedup_at(max_batch, speedup)
                                        + overhead)
            if rate >= capacity:  # unstable: the queue grows without bound
                out(f"{rate:>7g} {c:>3}   unstable: rate >= capacity {capacity:.2f}/s")
                continue
            s = simulate(arrivals, c, Service(per_image, speedup=speedup, overhead=overhead),
                         max_batch).summary()
            row = {"rate": rate, "workers": c, **{k: round(v, 3) for k, v in s.items()}}
            rows.append(row)
            mark = ""
            if best is None and s["p95"] <= target_p95:
                best, mark = c, f"  <- smallest c with p95 <= {target_p95:g} s"
                row["meets_target"] = True
            out(f"{rate:>7g} {c:>3} {s['p50']:>8.2f} {s['p95']:>8.2f} {s['p99']:>8.2f} "
                f"{s['utilisation']:>6.2f}{mark}")
    return rows


# --------------------------------------------------------------------------- measure

async def submit_trace(url: str, arrivals: Sequence[float], model: str | None) -> list[str]:
    """Submit one job at each offset (open loop: never waits for a result)."""
    import httpx

    ids: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        t0 = time.monotonic()

        async def one(k: int, at: float) -> None:
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            body = {"prompt": "a red square", "seed": k, **({"model": model} if model else {})}
            r = await http.post("/v1/generations", json=body)
            if r.status_code != 202:
                raise RuntimeError(f"submission {k} answered {r.status_code}: {r.text[:200]}")
            ids.append(r.json()["id"])

        await asyncio.gather(*(one(k, at) for k, at in enumerate(arrivals)))
    return ids


def measure(args: argparse.Namespace) -> dict:
    """A real run: Redis, the API and `args.workers` workers; the Poisson trace submitted
    open-loop; waits read from the job records; the same trace simulated beside it."""
    import redis

    from app.redis_server import RedisServer, free_port
    from tests.worker.helpers import (
        live_worker_names,
        make_tiny_checkpoint,
        start_api,
        start_worker,
        wait_for,
        wait_worker_ready,
    )
    from worker.protocol.schema import Keys

    tmp = Path(tempfile.mkdtemp(prefix="promptpix-capacity-"))
    checkpoint = args.checkpoint or make_tiny_checkpoint(tmp / "tiny.pth")
    arrivals = (load_trace(args.trace) if args.trace
                else poisson_arrivals(args.rate, args.duration, args.seed))
    rs = RedisServer().start()
    port = free_port()
    api = start_api(rs.url, port, tmp / "api.log", PROMPTPIX_RATE_LIMIT="0")
    procs, metric_ports = [], []
    try:
        for i in range(args.workers):
            before = live_worker_names(rs.url)
            mport = free_port()
            metric_ports.append(mport)
            w = start_worker(rs.url, checkpoint, tmp / f"worker{i}.log",
                             PROMPTPIX_WORKER_METRICS_PORT=str(mport),
                             PROMPTPIX_MAX_BATCH=str(args.max_batch))
            procs.append(w)
            wait_worker_ready(rs.url, w, before=before)
        ids = asyncio.run(submit_trace(f"http://127.0.0.1:{port}", arrivals, None))
        r = redis.Redis.from_url(rs.url, decode_responses=True)

        def all_done() -> bool:
            return all(r.hget(Keys.job(j), "status") in ("succeeded", "failed", "canceled")
                       for j in ids)

        wait_for(all_done, args.drain, f"{len(ids)} jobs to finish")
        jobs = [r.hgetall(Keys.job(j)) for j in ids]
        metrics_text = [fetch_metrics(f"http://127.0.0.1:{p}/metrics") for p in metric_ports]
    finally:
        for w in procs:
            w.stop()
        api.stop()
        rs.cleanup()
    failed = [j for j in jobs if j["status"] != "succeeded"]
    overheads = worker_overheads(jobs)
    waits = [float(j["started_at"]) - float(j["created_at"]) for j in jobs]
    # Sampling time of each job (batch 1: one job = one image).
    samples = [float(j["finished_at"]) - float(j["started_at"]) for j in jobs]
    in_order = [s for _, s in sorted(zip((float(j["created_at"]) for j in jobs), samples,
                                         strict=True))]
    per_image = statistics.fmean(per_image_from_metrics(t) for t in metrics_text)
    # Simulate the same submission times (as the server stamped them) with the measured
    # sampling times: fixed at the metrics' mean, and resampled from the jobs' own times.
    created = sorted(float(j["created_at"]) for j in jobs)
    stamped = [t - created[0] for t in created]
    overhead = statistics.fmean(overheads) if overheads else 0.0
    sim_fixed = simulate(stamped, args.workers, Service(per_image), args.max_batch).summary()
    sim_over = simulate(stamped, args.workers, Service(per_image, overhead=overhead),
                        args.max_batch).summary()
    sim_emp = simulate(stamped, args.workers,
                       Service(statistics.fmean(samples), "empirical", samples,
                               overhead=overhead), args.max_batch).summary()
    sim_replay = simulate(stamped, args.workers,
                          Service(statistics.fmean(samples), "replay", in_order,
                                  overhead=overhead), args.max_batch).summary()
    measured = {"p50": pct(waits, 0.5), "p95": pct(waits, 0.95), "p99": pct(waits, 0.99),
                "mean": statistics.fmean(waits)}
    return {"jobs": len(jobs), "failed": len(failed), "workers": args.workers,
            "max_batch": args.max_batch, "rate": args.rate, "duration_s": args.duration,
            "per_image_s_from_metrics": round(per_image, 4),
            "sampling_s_jobs": {"mean": round(statistics.fmean(samples), 4),
                                "p50": round(pct(samples, 0.5), 4),
                                "p95": round(pct(samples, 0.95), 4)},
            "overhead_s_per_job": round(overhead, 4), "overhead_samples": len(overheads),
            "offered_utilisation": round(len(jobs) / (stamped[-1] or 1)
                                         * (per_image + overhead) / args.workers, 3),
            "wait_s": {"measured": _round(measured),
                       "simulated_sampling_only": _round(sim_fixed),
                       "simulated_with_overhead": _round(sim_over),
                       "simulated_empirical": _round(sim_emp),
                       "simulated_replayed": _round(sim_replay)},
            "arrivals_s": [round(a, 4) for a in stamped], "logs": str(tmp)}


def worker_overheads(jobs: list[dict[str, str]]) -> list[float]:
    """Per worker, the gap between finishing a job and starting the next one while that
    next one was already queued: time the worker spends on a job outside sampling."""
    by_worker: dict[str, list[dict[str, str]]] = {}
    for j in jobs:
        if j.get("started_at") and j.get("finished_at"):
            by_worker.setdefault(j.get("worker", ""), []).append(j)
    gaps = []
    for done in by_worker.values():
        done.sort(key=lambda j: float(j["started_at"]))
        for prev, nxt in itertools.pairwise(done):
            if float(nxt["created_at"]) < float(prev["finished_at"]):
                gaps.append(float(nxt["started_at"]) - float(prev["finished_at"]))
    return gaps


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in d.items()}


def print_measure(report: dict) -> None:
    w = report["wait_s"]
    print(f"{report['jobs']} jobs ({report['failed']} failed), {report['workers']} workers, "
          f"max batch {report['max_batch']}, per-image sampling "
          f"{report['per_image_s_from_metrics']} s (metrics) + overhead "
          f"{report['overhead_s_per_job']} s a job, "
          f"offered utilisation {report['offered_utilisation']}")
    print(f"{'wait s':<24} {'p50':>7} {'p95':>7} {'p99':>7} {'mean':>7}")
    for name in w:
        row = w[name]
        print(f"{name:<24} {row['p50']:>7.3f} {row['p95']:>7.3f} {row['p99']:>7.3f} "
              f"{row['mean']:>7.3f}")


# --------------------------------------------------------------------------- CLI

def parse_speedup(spec: str) -> dict[int, float]:
    """'8:2.89' or '4:2.0,8:2.89' -> {1: 1.0, 4: 2.0, 8: 2.89}."""
    out = {1: 1.0}
    for part in filter(None, spec.split(",")):
        k, _, v = part.partition(":")
        out[int(k)] = float(v)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="p50/p95/p99 wait and utilisation for a range of workers")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--service-time", type=float, help="seconds of sampling per image (batch 1)")
    src.add_argument("--metrics-url", help="a worker's /metrics to read the per-image time from")
    t.add_argument("--rates", type=float, nargs="+", required=True, help="arrival rates, jobs/s")
    t.add_argument("--workers", default="1-16", help="worker counts, e.g. 1-16 or 1,2,4")
    t.add_argument("--max-batch", type=int, default=1, help="PROMPTPIX_MAX_BATCH")
    t.add_argument("--overhead", type=float, default=0.0,
                   help="worker seconds per batch outside sampling (`measure` reports it)")
    t.add_argument("--batch-speedup", default="8:2.89",
                   help="measured speed-up points k:x (default: this CPU's, docs/benchmarks.md)")
    t.add_argument("--duration", type=float, default=3600.0, help="simulated seconds")
    t.add_argument("--target-p95", type=float, default=10.0, help="p95 wait target, s")
    t.add_argument("--trace", type=Path, help="replay these arrivals instead of Poisson")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", type=Path)
    m = sub.add_parser("measure", help="a real run here vs the simulation of its trace")
    m.add_argument("--rate", type=float, default=3.0)
    m.add_argument("--duration", type=float, default=60.0)
    m.add_argument("--workers", type=int, default=2)
    m.add_argument("--max-batch", type=int, default=1)
    m.add_argument("--checkpoint", type=Path, default=None,
                   help="model for the workers (default: a tiny one trained here)")
    m.add_argument("--trace", type=Path, help="replay these arrivals instead of Poisson")
    m.add_argument("--drain", type=float, default=600.0)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    if args.cmd == "measure":
        report = measure(args)
        print_measure(report)
        report["command"] = "python bench/capacity.py " + " ".join(argv or sys.argv[1:])
    else:
        per_image = args.service_time or per_image_from_metrics(fetch_metrics(args.metrics_url))
        speedup = parse_speedup(args.batch_speedup)
        if args.trace:
            arrivals = load_trace(args.trace)
            print(f"trace {args.trace}: {len(arrivals)} arrivals over {arrivals[-1]:.0f} s")
            rows = []
            for c in parse_range(args.workers):
                s = simulate(arrivals, c, Service(per_image, speedup=speedup,
                                                  overhead=args.overhead),
                             args.max_batch).summary()
                rows.append({"workers": c, **_round(s)})
                print(f"c={c:>3} p50 {s['p50']:.2f} p95 {s['p95']:.2f} p99 {s['p99']:.2f} "
                      f"util {s['utilisation']:.2f}")
        else:
            rows = table(per_image, args.rates, parse_range(args.workers), args.max_batch,
                         speedup, args.duration, args.target_p95, args.seed, args.overhead)
        report = {"per_image_s": per_image, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
