"""What a job costs in Redis: bytes per queued job, per finished job and per image.

Starts a private redis-server and a real worker on a checkpoint, runs `--jobs` jobs of
`--images` images each, and prints MEMORY USAGE of each key kind plus the growth of
`used_memory`, then jobs per GB of `maxmemory`. Run:

    nice -n 10 .venv/bin/python bench/redis_footprint.py --checkpoint checkpoints/demo/shapes16.pth
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.redis_server import RedisServer  # noqa: E402
from tests.worker.helpers import start_worker, wait_for, wait_worker_ready  # noqa: E402
from worker.protocol import GenerationParams, JobStore, Keys, Settings, rq_job_id  # noqa: E402

GB = 1024**3


def used(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--images", type=int, default=4)
    args = ap.parse_args()
    server = RedisServer().start()
    r = redis.Redis.from_url(server.url)
    store = JobStore(r, Settings(redis_url=server.url))
    tmp = Path(tempfile.mkdtemp(prefix="footprint-"))
    try:
        # Queued jobs first (no worker yet): what waiting costs.
        base = used(r)
        ids = [store.create_job(GenerationParams(prompt=f"a red circle number {i}",
                                                 num_images=args.images, seed=i),
                                owner="o" * 32, idempotency=(Keys.idempotency("o", str(i)),
                                                             "h" * 64), quota_who="key:o")[0]
               for i in range(args.jobs)]
        queued_growth = (used(r) - base) / args.jobs
        queued_keys = {
            "job hash": statistics.median(r.memory_usage(Keys.job(j)) for j in ids),
            "RQ job hash": statistics.median(
                r.memory_usage(f"rq:job:{rq_job_id(j, 1)}") for j in ids),
            "idempotency key": statistics.median(
                r.memory_usage(Keys.idempotency("o", str(i))) for i in range(args.jobs)),
        }
        w = start_worker(server.url, Path(args.checkpoint), tmp / "w.log")
        try:
            wait_worker_ready(server.url, w)
            wait_for(lambda: all(store.get(j).status == "succeeded"
                                 for j in ids), 1800, "the jobs", every=0.5)
        finally:
            w.stop()
        time.sleep(0.5)
        done_growth = (used(r) - base) / args.jobs
        images = [r.memory_usage(Keys.image(j, k)) for j in ids for k in range(args.images)]
        previews = [r.memory_usage(Keys.preview(j)) for j in ids]
        finished = {
            "job hash": statistics.median(r.memory_usage(Keys.job(j)) for j in ids),
            "image (one PNG)": statistics.median(images),
            "preview": statistics.median(previews),
        }
        print(f"checkpoint {args.checkpoint}, {args.jobs} jobs x {args.images} images")
        print(f"queued: used_memory growth {queued_growth:.0f} B/job; "
              + ", ".join(f"{k} {v:.0f} B" for k, v in queued_keys.items()))
        print(f"finished: used_memory growth {done_growth:.0f} B/job; "
              + ", ".join(f"{k} {v:.0f} B" for k, v in finished.items()))
        per_image = (done_growth - finished["job hash"] - finished["preview"]) / args.images
        print(f"per image (growth less job hash and preview): {per_image:.0f} B")
        print(f"per GB: {GB / queued_growth:,.0f} queued jobs, {GB / done_growth:,.0f} finished "
              f"jobs of {args.images} images")
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
