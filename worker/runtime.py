"""`promptpix worker`: load the checkpoint once, register its model, then serve that
model's queue (`generate:<model>`) only.

A non-forking RQ worker (CUDA cannot be used in a forked child), plus two daemon threads:
the heartbeat (the worker's liveness key, its model, its current job) and the reaper.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

EXIT_CONFIG = 2  # bad settings, missing or corrupt checkpoint, bad device
EXIT_METRICS = 3  # the metrics port is taken
FULL_REDIS_PAUSE_S = 1.0  # between two tries of the RQ loop while Redis refuses writes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promptpix worker",
                                description="serve generation jobs from Redis with one model")
    p.add_argument("--checkpoint", help="checkpoint file (default: PROMPTPIX_CHECKPOINT)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: PROMPTPIX_DEVICE or auto)")
    p.add_argument("--name", help="worker name (default: host-pid-random)")
    p.add_argument("--metrics-port", type=int,
                   help="Prometheus port (default: PROMPTPIX_WORKER_METRICS_PORT; 0 = auto)")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--log-level", default="INFO")
    return p


def _fail(message: str, code: int = EXIT_CONFIG) -> int:
    print(f"promptpix worker: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run a worker until SIGTERM/SIGINT (or an empty queue with --burst); exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pydantic import ValidationError

    from .protocol import Settings, describe_settings_error
    from .protocol.settings import model_name_for

    try:
        settings = Settings()
    except ValidationError as e:
        return _fail(f"invalid settings:\n{describe_settings_error(e)}")
    checkpoint = args.checkpoint or settings.checkpoint
    if not checkpoint:
        return _fail("no checkpoint: set PROMPTPIX_CHECKPOINT or pass --checkpoint")

    import torch

    from model import CheckpointError, load_checkpoint

    device = args.device or settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch_device = torch.device(device)
    except RuntimeError as e:
        return _fail(f"invalid device {device!r}: {e}")
    t0 = time.perf_counter()
    try:
        model, meta = load_checkpoint(checkpoint, map_location=torch_device)
    except CheckpointError as e:
        return _fail(f"cannot load checkpoint: {e}")
    except (RuntimeError, AssertionError) as e:  # e.g. cuda asked for on a machine without it
        return _fail(f"cannot place the model on {device}: {e}")
    model.eval()
    info = model_info(model, meta, model_name_for(checkpoint, settings.model_name))
    logger.info("loaded %s (model %s, %d parameters) on %s in %.1f s", checkpoint, info["id"],
                info["parameters"], device, time.perf_counter() - t0)
    from model import compiled_decoder

    decoder, why = compiled_decoder(model, settings.compile)
    log = logger.warning if settings.compile and decoder is None else logger.info
    log("sampling: %s; up to %d image(s) per batch (PROMPTPIX_MAX_BATCH)", why,
        settings.max_batch)
    return serve(settings, model, info, device, args, decoder)


def model_info(model: Any, meta: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """What `/v1/models` shows for this checkpoint (plain JSON types only).

    `id` (= `name`) is the name people type (PROMPTPIX_MODEL_NAME or the file stem; the
    content hash when not given); `checksum` is the content hash.
    """
    c = model.config
    val_bpd = meta.get("val_bpd")
    checksum = str(meta["model_id"])
    return {
        "id": name or checksum, "name": name or checksum, "checksum": checksum,
        "created": int(meta["created"]) if meta.get("created") else None,
        "image_size": int(c.image_size), "channels": int(c.channels),
        "num_classes": int(c.num_classes), "parameters": int(meta.get("parameters") or 0),
        "dataset": meta.get("dataset"), "steps": meta.get("steps"),
        "val_bpd": None if val_bpd is None else float(val_bpd),
        "default_guidance_scale": float(meta.get("default_guidance_scale") or 1.0),
        "example_prompts": [str(x) for x in (meta.get("example_prompts") or [])][:20],
    }


def serve(settings: Any, model: Any, info: dict[str, Any], device: str,
          args: argparse.Namespace, decoder: Any = None) -> int:
    """Connect, publish liveness, and run the RQ loop until asked to stop."""
    import redis
    from rq import SimpleWorker
    from rq.exceptions import StopRequested
    from rq.serializers import JSONSerializer
    from rq.utils import now as rq_now

    from . import jobs, metrics, rq_guard
    from .protocol import (
        JobStore,
        ModelConflict,
        Periodic,
        queue_name,
        redis_connection,
        start_reaper,
        storage_full,
    )

    port = settings.worker_metrics_port if args.metrics_port is None else args.metrics_port
    try:
        port = metrics.serve_metrics(port)
    except OSError as e:
        return _fail(f"metrics port {port} unavailable ({e}); set PROMPTPIX_WORKER_METRICS_PORT "
                     "to a free port or 0", EXIT_METRICS)
    logger.info("worker metrics on port %d", port)
    metrics.MODEL_LOADED.labels(info["id"]).set(1)

    name = args.name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    store = JobStore(redis_connection(settings), settings, model=info["id"])
    ctx = jobs.WorkerContext(store=store, settings=settings, model=model, model_info=info,
                             worker_name=name, decoder=decoder)
    jobs.set_context(ctx)

    def beat() -> None:
        # The time first, then one read of the list (the job thread replaces it, never edits
        # it): a job announced after the read is claimed after `ts`, so the reaper, which
        # spares jobs claimed at or after a beat's `ts`, never takes this beat to mean "lost".
        ts = time.time()
        current = ctx.current_jobs
        store.heartbeat(name, {"name": name, "model_id": info["id"],
                               "job": current[0] if current else None, "jobs": current,
                               "ts": ts, "pid": os.getpid(),
                               "host": socket.gethostname(), "device": device,
                               "metrics_port": port}, info)

    while True:  # wait for Redis rather than die: workers may start before it
        try:
            store.register_model(info)
            beat()
            break
        except ModelConflict as e:
            return _fail(str(e))
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as e:
            if isinstance(e, redis.ResponseError) and not storage_full(e):
                raise
            logger.warning("Redis %s unreachable or full (%s); retrying",
                           settings.redis_url_safe, e)
            time.sleep(min(5.0, settings.heartbeat_interval))
    heart = Periodic("promptpix-heartbeat", settings.heartbeat_interval, beat)
    heart.start()
    reaper = start_reaper(store)

    class PromptPixWorker(SimpleWorker):
        """SimpleWorker that runs only allowlisted job functions (`rq_guard`), with this
        worker's PROMPTPIX_JOB_TIMEOUT and a deadline on shutdown."""

        def execute_job(self, job: Any, queue: Any) -> None:
            reason = rq_guard.refusal(job)
            if reason is not None:
                _refuse(job, queue, reason, store)
                return
            # The worker's own limit holds (it knows its hardware), not the submitter's.
            job.timeout = settings.job_timeout
            super().execute_job(job, queue)

        def clean_registries(self) -> None:
            # RQ's own cleanup runs abandoned entries' failure callbacks and webhooks.
            for queue in self.queues:
                if queue.acquire_maintenance_lock():
                    rq_guard.clean_registries(queue)
                    queue.release_maintenance_lock()
            self.last_cleaned_at = rq_now()

        def clean_group_registries(self) -> None:
            pass  # no groups in this project; RQ's cleanup of them would run their hooks

        def request_stop(self, signum: int, frame: FrameType | None) -> None:
            if ctx.shutdown_deadline is None:
                ctx.shutdown_deadline = time.monotonic() + settings.shutdown_grace
                logger.info("worker %s: stopping; current job has %.0f s to finish", name,
                            settings.shutdown_grace)
            super().request_stop(signum, frame)

    queue = queue_name(info["id"])
    logger.info("worker %s serving queue %r (model %s)", name, queue, info["id"])
    rounds = 0
    was_full = False
    try:
        while True:
            # RQ's loop quits on any error it does not handle itself, such as Redis going
            # away in the middle of a job (recording the job's end needs Redis). The model
            # stays loaded: wait for Redis and serve again in this process. A fresh RQ name
            # per round, because the crashed round could not register its death.
            rq_name = name if rounds == 0 else f"{name}-r{rounds}"
            worker = PromptPixWorker([queue], name=rq_name, serializer=JSONSerializer,
                                     connection=redis_connection(settings, blocking=True))
            try:
                worker.work(burst=args.burst, logging_level=args.log_level.upper())
                full = False
            except (redis.ConnectionError, redis.TimeoutError) as e:
                logger.warning("worker %s: RQ loop lost Redis (%s)", name, e)
                full = False
            except redis.ResponseError as e:
                # RQ's own bookkeeping (registering the worker, BLMOVE) is refused while
                # Redis is full: wait for room, keep the model, never exit for it.
                if not storage_full(e):
                    raise
                if not was_full:
                    logger.warning("worker %s: Redis is full (%s); serving again when it has "
                                   "room", name, e)
                full = True
            finally:
                _release_pubsub(worker)
            if args.burst or ctx.shutdown_deadline is not None:
                break
            if not full:
                logger.warning("worker %s: RQ loop ended without a stop request; serving "
                               "again once Redis answers", name)
            was_full = full
            if not _wait_for_redis(store, ctx, every=FULL_REDIS_PAUSE_S if full else 0.5):
                break
            rounds += 1
    except StopRequested:
        pass  # SIGTERM while waiting for Redis: RQ's handler is still installed
    finally:
        heart.stop()
        reaper.stop()
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            store.remove_worker(name)  # else its key expires by itself
        jobs.set_context(None)
        logger.info("worker %s stopped", name)
    return 0


def _refuse(job: Any, queue: Any, reason: str, store: Any) -> None:
    """Fail a queue entry the worker will not run, and the promptpix job it stands for."""
    from . import rq_guard
    from .protocol import JobErrorCode

    logger.error("refused queue entry %s (%s): %s", job.id, rq_guard.entry_fields(job), reason)
    try:
        rq_guard.fail_refused(job, queue, reason)
    except Exception:  # a malformed entry must not stop the worker
        logger.exception("queue entry %s: could not be marked failed", job.id)
        with contextlib.suppress(Exception):
            job.connection.lrem(queue.intermediate_queue_key, 1, job.id)
    outcome = store.fail_queued(job.id, JobErrorCode.INVALID_PAYLOAD,
                                f"the queue entry was refused: {reason}")
    if outcome is not None:
        logger.error("queue entry %s: its job ended %s", job.id, outcome)


def _release_pubsub(worker: Any) -> None:
    """Stop the RQ worker's command-listener thread; RQ's own teardown skips it when
    registering the worker's death fails (Redis gone), leaving it to retry forever."""
    thread = getattr(worker, "pubsub_thread", None)
    if thread is not None and thread.is_alive():
        thread.stop()
        thread.join(timeout=3)
    pubsub = getattr(worker, "pubsub", None)
    if pubsub is not None:
        with contextlib.suppress(Exception):
            pubsub.close()


def _wait_for_redis(store: Any, ctx: Any, every: float = 0.5) -> bool:
    """Block until Redis answers (True) or a stop is requested (False)."""
    import redis

    time.sleep(every)  # also paces restarts if RQ's loop keeps failing for another reason
    while ctx.shutdown_deadline is None:
        try:
            store.r.ping()
            return True
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(every)
    return False


if __name__ == "__main__":
    sys.exit(main())
