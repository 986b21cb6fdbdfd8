"""Liveness: worker heartbeats, the models they serve, and the reaper's sweeps (lost
workers' jobs, queue entries taken but never claimed, admissions never enqueued)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import redis
from rq.job import Job

from .base import _s
from .connection import storage_full
from .record import JobRecord
from .schema import JobStatus, Keys, rq_job_id
from .transitions import TransitionOps

logger = logging.getLogger(__name__)

WORKER_FORGET_S = 3600  # names of workers silent this long leave the `workers` zset
NEVER_ENQUEUED_BATCH = 256  # queued jobs one reaper sweep checks for a lost RQ entry


class LivenessOps(TransitionOps):
    """Heartbeats and reaping (reaping requeues through the transitions)."""

    def heartbeat(self, name: str, info: dict[str, Any], model: dict[str, Any] | None) -> None:
        """Refresh this worker's key for one heartbeat TTL (and register its model again
        if the registry was lost, e.g. with a Redis restart without persistence)."""
        ttl = self.settings.heartbeat_ttl_ms
        try:
            with self.r.pipeline(transaction=False) as pipe:
                pipe.set(Keys.worker(name), json.dumps(info), px=ttl)
                pipe.zadd(Keys.workers, {name: time.time()})
                if model is not None:
                    pipe.hsetnx(Keys.models, model["id"], json.dumps(model))
                pipe.execute()
        except redis.ResponseError as e:
            if not storage_full(e):
                raise
            # Redis is full (noeviction): SET is refused, PEXPIRE is not. The keys keep
            # their last info (the reaper spares jobs claimed after that info's `ts`), so a
            # worker is not reaped, and its jobs not handed on, only because Redis is full.
            with self.r.pipeline(transaction=False) as pipe:
                pipe.pexpire(Keys.worker(name), ttl)
                alive = pipe.execute()[0]
            if not alive:
                raise  # the key already expired: nothing left to keep alive
            logger.debug("heartbeat of %s kept by PEXPIRE (Redis is full)", name)

    def remove_worker(self, name: str) -> None:
        """Forget a worker that exits cleanly (its model stays registered)."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.delete(Keys.worker(name))
            pipe.zrem(Keys.workers, name)
            pipe.execute()

    def live_workers(self) -> list[dict[str, Any]]:
        """Info of every worker whose heartbeat key is alive."""
        self.r.zremrangebyscore(Keys.workers, "-inf", time.time() - WORKER_FORGET_S)
        names = [_s(n) for n in self.r.zrange(Keys.workers, 0, -1)]
        if not names:
            return []
        values = self.r.mget([Keys.worker(n) for n in names if n])
        return [json.loads(v) for v in values if v is not None]

    def reap(self) -> list[tuple[str, str]]:
        """Requeue or fail running jobs whose worker key expired; return (job, outcome)."""
        done: list[tuple[str, str]] = []
        for raw in self.r.smembers(Keys.running):
            job_id = _s(raw) or ""
            job = self.get(job_id)
            if job is None or job.status is not JobStatus.RUNNING:
                self.r.srem(Keys.running, job_id)
                continue
            worker = job.worker
            beat = self.r.get(Keys.worker(worker)) if worker else None
            if beat is not None:
                info = json.loads(beat)
                # Alive and still on this job (batches list all theirs in `jobs`), or its
                # last beat predates the claim.
                mine = info.get("jobs") or [info.get("job")]
                if job_id in mine or float(info.get("ts", 0)) <= (job.started_at or 0.0):
                    continue
            outcome = self.requeue(job_id, job.attempt, worker, lost=True)
            done.append((job_id, outcome))
        return done

    def reap_orphans(self) -> list[tuple[str, str]]:
        """Requeue `queued` jobs whose queue entry a worker took but never claimed.

        RQ moves an entry off the queue (into its intermediate list, then its started
        registry) before our claim marks the job `running`. A worker killed, or a Redis
        restart, inside that window leaves the job `queued` with no queue entry: it would
        never run. An entry still unclaimed after one heartbeat TTL gets a fresh attempt at
        the front of the queue (not counted as a retry); the old entry is fenced by its id.
        """
        grace = max(self.settings.heartbeat_ttl_ms / 1000, 2 * self.settings.reaper_interval)
        seen_key = f"{Keys.running}:unclaimed"
        now = time.time()
        rq_ids: set[str] = set()
        for model in self.known_models():
            queue = self.queue_for(model)
            rq_ids |= {_s(x) or "" for x in self.r.lrange(queue.intermediate_queue_key, 0, -1)}
            rq_ids |= {(_s(x) or "").split(":")[0]
                       for x in self.r.zrange(queue.started_job_registry.key, 0, -1)}
        done: list[tuple[str, str]] = []
        live = set()
        for rq_id in rq_ids:
            job_id, _, _ = rq_id.rpartition("-a")
            job = self.get(job_id)
            if job is None or job.status is not JobStatus.QUEUED or job.rq_id != rq_id:
                continue
            live.add(rq_id)
            first = _s(self.r.hget(seen_key, rq_id))
            if first is None:
                self.r.hset(seen_key, rq_id, repr(now))
            elif now - float(first) >= grace and self._requeue_unclaimed(job_id, rq_id):
                done.append((job_id, "requeued (taken from the queue, never claimed)"))
        for stale in {_s(x) or "" for x in self.r.hkeys(seen_key)} - live:
            self.r.hdel(seen_key, stale)
        return done + self._reap_never_enqueued(now - grace)

    def _reap_never_enqueued(self, before: float) -> list[tuple[str, str]]:
        """Enqueue admitted jobs whose RQ entry is missing. Admission writes the entry in
        its own step (`scripts.ADMIT`), so this is the net for an entry lost otherwise (a
        job admitted by an API from before that, an entry deleted by hand).

        A sweep checks at most `NEVER_ENQUEUED_BATCH` jobs, walking the queued set (by
        admission time) from where the previous sweep stopped and wrapping around: a
        backlog of any size costs the same per sweep and is covered in len / batch sweeps.
        """
        cursor_key = f"{Keys.queued}:cursor"
        cursor = _s(self.r.get(cursor_key))
        found = self.r.zrangebyscore(Keys.queued, f"({cursor}" if cursor else "-inf", before,
                                     start=0, num=NEVER_ENQUEUED_BATCH, withscores=True)
        if len(found) < NEVER_ENQUEUED_BATCH:
            self.r.delete(cursor_key)  # the end: the next sweep starts again from the oldest
        else:
            self.r.set(cursor_key, repr(found[-1][1]))
        ids = [_s(job_id) or "" for job_id, _ in found]
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(Keys.job(job_id), "status", "rq_id")
            fields = pipe.execute()
        candidates = [(job_id, _s(rq_id) or "")
                      for job_id, (status, rq_id) in zip(ids, fields, strict=True)
                      if _s(status) == JobStatus.QUEUED.value and rq_id]
        with self.r.pipeline(transaction=False) as pipe:
            for _, rq_id in candidates:
                pipe.exists(Job.key_for(rq_id))
            present = pipe.execute()
        done = []
        for (job_id, rq_id), there in zip(candidates, present, strict=True):
            if not there and self._requeue_unclaimed(job_id, rq_id):
                done.append((job_id, "enqueued (admitted, its queue entry never written)"))
        return done

    def _requeue_unclaimed(self, job_id: str, rq_id: str) -> bool:
        key = Keys.job(job_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hgetall(key)
                    job = JobRecord.from_hash(raw) if raw else None
                    if job is None or job.status is not JobStatus.QUEUED or job.rq_id != rq_id:
                        pipe.unwatch()
                        return False
                    new = job.attempt + 1
                    pipe.multi()
                    pipe.hset(key, mapping={"attempt": str(new), "rq_id": rq_job_id(job_id, new)})
                    pipe.lrem(self.job_queue(job).intermediate_queue_key, 0, rq_id)
                    pipe.hdel(f"{Keys.running}:unclaimed", rq_id)
                    self._enqueue(pipe, job_id, new, job.params, job.test_hooks, at_front=True,
                                  kind=job.kind)
                    pipe.execute()
                    logger.warning("job %s: queue entry %s was taken but never claimed; "
                                   "requeued as attempt %d", job_id, rq_id, new)
                    return True
                except redis.WatchError:
                    continue

    def try_reaper_lock(self, interval: float) -> bool:
        """At most one sweep per interval across all processes sharing this Redis."""
        token = uuid.uuid4().hex
        return bool(self.r.set(Keys.reaper_lock, token, nx=True, px=max(1, int(interval * 1000))))
