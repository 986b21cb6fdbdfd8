"""Job-store transitions and the reaper over a real Redis, with no worker process."""

from __future__ import annotations

import json
import time
import zlib

import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import utcparse

from worker.protocol import (
    JOB_FUNC,
    GenerationParams,
    JobKind,
    JobStatus,
    JobStore,
    Keys,
    PayloadError,
    Settings,
    liveness,
    parse_payload,
    reap_once,
    rq_job_id,
)
from worker.protocol.rqentry import rq_time, unpack, zlib_stored


@pytest.fixture
def store(redis_url: str) -> JobStore:
    s = Settings(redis_url=redis_url, heartbeat_interval=0.1, reaper_interval=0.05,
                 max_retries=1)
    return JobStore(redis.Redis.from_url(redis_url), s, model="m1")


MODEL = {"id": "m1", "image_size": 8, "channels": 3}


def params(seed: int = 1) -> GenerationParams:
    return GenerationParams(prompt="a red square", num_images=2, seed=seed)


def beat(store: JobStore, name: str, job: str | None) -> None:
    store.heartbeat(name, {"name": name, "model_id": "m1", "job": job, "ts": time.time()},
                    {**MODEL, "parameters": 1})


def test_claim_progress_finish(store: JobStore) -> None:
    job_id, created = store.create_job(params())
    assert created
    assert store.claim(job_id, rq_job_id(job_id, 1), "w1", MODEL) == "ok"
    assert store.claim(job_id, rq_job_id(job_id, 1), "w2", MODEL) == "running"
    assert store.write_progress(job_id, 1, "w1", 0.5, b"png")
    assert store.write_progress(job_id, 1, "w1", 0.25, None)  # never decreases
    assert store.get(job_id).progress == 0.5
    assert not store.write_progress(job_id, 1, "w2", 0.9, None)  # not the owner
    assert not store.should_stop(job_id, 1, "w1") and store.should_stop(job_id, 1, "w2")
    assert store.finish(job_id, 1, "w1", JobStatus.SUCCEEDED, images=[b"a", b"b"])
    job = store.get(job_id)
    assert job.status == "succeeded" and job.images == 2 and job.progress == 1
    assert store.get_blob(Keys.image(job_id, 1)) == b"b"
    assert 0 < store.r.ttl(Keys.image(job_id, 0)) <= store.settings.result_ttl
    assert not store.r.sismember(Keys.running, job_id)


def test_cancel_running_fences_worker(store: JobStore) -> None:
    job_id, _ = store.create_job(params())
    store.claim(job_id, rq_job_id(job_id, 1), "w1", MODEL)
    assert store.cancel(job_id) == "ok"
    assert store.should_stop(job_id, 1, "w1")
    assert not store.finish(job_id, 1, "w1", JobStatus.SUCCEEDED, images=[b"x"])
    assert store.get(job_id).status == "canceled"
    assert store.cancel(job_id) == "canceled"


def test_reaper_requeues_at_front_then_fails(store: JobStore) -> None:
    other, _ = store.create_job(params(2))
    job_id, _ = store.create_job(params())
    store.r.lrem(store.queue.key, 0, rq_job_id(job_id, 1))  # a worker popped it
    beat(store, "w1", job_id)
    assert store.claim(job_id, rq_job_id(job_id, 1), "w1", MODEL) == "ok"
    store.write_progress(job_id, 1, "w1", 0.5, b"png")
    assert store.reap() == []  # heartbeat alive, reporting this job
    store.r.delete(Keys.worker("w1"))  # the worker died: its key expired
    assert reap_once(store) == [(job_id, "requeued")]
    job = store.get(job_id)
    assert job.status == "queued" and job.attempt == 2 and job.progress == 0
    assert not job.has_preview and store.get_blob(Keys.preview(job_id)) is None
    again = store.get(job_id)
    assert again is not None and again.attempt == 2
    assert store.queue_position(again) == 0  # front, before `other`
    assert store.queue_position(store.get(other)) == 1  # type: ignore[arg-type]
    # The lost attempt can no longer write anything.
    assert not store.write_progress(job_id, 1, "w1", 0.9, None)
    assert not store.finish(job_id, 1, "w1", JobStatus.SUCCEEDED, images=[b"x"])
    # Second loss: max_retries=1 is used up -> worker_lost.
    beat(store, "w2", job_id)
    assert store.claim(job_id, rq_job_id(job_id, 2), "w2", MODEL) == "ok"
    store.r.delete(Keys.worker("w2"))
    assert store.reap() == [(job_id, "failed")]
    job = store.get(job_id)
    assert job.status == "failed" and job.error_code == "worker_lost"
    assert store.reap() == []


def test_reaper_sees_worker_that_moved_on(store: JobStore) -> None:
    job_id, _ = store.create_job(params())
    beat(store, "w1", job_id)
    store.claim(job_id, rq_job_id(job_id, 1), "w1", MODEL)
    time.sleep(0.01)
    beat(store, "w1", None)  # alive, but a later beat no longer names the job
    assert store.reap() == [(job_id, "requeued")]


def test_stale_queue_entries_are_skipped(store: JobStore) -> None:
    job_id, _ = store.create_job(params())
    assert store.claim(job_id, rq_job_id(job_id, 7), "w1", MODEL) == "stale"
    store.cancel(job_id)
    assert store.claim(job_id, rq_job_id(job_id, 1), "w1", MODEL) == "canceled"
    assert store.claim("f" * 32, rq_job_id("f" * 32, 1), "w1", MODEL) == "missing"


def test_shutdown_requeue_does_not_count(store: JobStore) -> None:
    job_id, _ = store.create_job(params())
    store.claim(job_id, rq_job_id(job_id, 1), "w1", MODEL)
    assert store.requeue(job_id, 1, "w1", lost=False) == "requeued"
    job = store.get(job_id)
    assert job.attempt == 2 and job.retries == 0
    assert store.requeue(job_id, 1, "w1", lost=False) == "skip"


def test_reaper_lock_one_sweep_per_interval(store: JobStore) -> None:
    assert store.try_reaper_lock(1.0)
    assert not store.try_reaper_lock(1.0)


def test_live_workers_and_models(store: JobStore) -> None:
    beat(store, "w1", None)
    beat(store, "w2", None)
    assert {w["name"] for w in store.live_workers()} == {"w1", "w2"}
    assert [m["id"] for m in store.models()] == ["m1"]
    time.sleep(0.4)  # heartbeat TTL = 3 x 0.1 s
    # Workers expire; their model stays registered (jobs for it are still accepted).
    assert store.live_workers() == [] and [m["id"] for m in store.models()] == ["m1"]


def test_model_registry_names_and_conflicts(redis_url: str) -> None:
    """Issue 17 phase B: models registered for good, checked by checksum, resolved by
    name, alias, default or as the only one."""
    from worker.protocol import ModelConflict, ModelNotFound, ModelRequired, NoModelRegistered

    s = Settings(redis_url=redis_url, model_aliases="dall-e-3=a")
    store = JobStore(redis.Redis.from_url(redis_url), s)
    for requested in (None, "a"):  # nothing known yet: not ready, rather than a bad request
        with pytest.raises(NoModelRegistered, match="no model is registered yet"):
            store.resolve_model(requested)
    store.register_model({"id": "a", "checksum": "c1", "num_classes": 0})
    assert store.resolve_model(None)["id"] == "a"  # the only one
    store.register_model({"id": "a", "checksum": "c1", "num_classes": 3})  # same weights
    with pytest.raises(ModelConflict, match=r"'a' is registered with checksum 'c1'.*'c2'"):
        store.register_model({"id": "a", "checksum": "c2"})
    store.register_model({"id": "b", "checksum": "c2"})
    with pytest.raises(ModelRequired, match="a, b"):
        store.resolve_model(None)
    assert store.resolve_model("dall-e-3")["num_classes"] == 3
    assert store.resolve_model("c2")["id"] == "b"  # the checksum names its model too
    with pytest.raises(ModelNotFound, match="'zz' is not known here; models: a, b"):
        store.resolve_model("zz")
    declared = JobStore(store.r, Settings(redis_url=redis_url, models="z",
                                          default_model="b"))
    assert declared.resolve_model("z") == {"id": "z"}
    assert declared.resolve_model(None)["id"] == "b"
    assert declared.known_models() == ["a", "b", "z"]


def test_payload_validation() -> None:
    good = {"job_id": "a" * 32, "attempt": 1,
            "params": json.loads(params().model_dump_json())}
    assert parse_payload(good).params.image_seeds() == [1, 2]
    for bad in ({**good, "attempt": "1"}, {**good, "job_id": "../x"}, {**good, "extra": 1},
                {**good, "params": {**good["params"], "seed": -1}}, [good], None):
        with pytest.raises(PayloadError):
            parse_payload(bad)


@pytest.mark.parametrize("field, value", [
    ("top_k", 1180591620717411303424), ("top_k", 257), ("num_images", 257),
    ("guidance_scale", 1e300), ("class_label", 2**40), ("prompt", "a" * 10001),
    ("seed", 2**53),
])
def test_payload_numbers_are_bounded(field: str, value: object) -> None:
    """Every number a client sets is bounded in the shared schema (issue 14, item 9)."""
    good = {"job_id": "a" * 32, "attempt": 1,
            "params": json.loads(params().model_dump_json())}
    with pytest.raises(PayloadError, match=field):
        parse_payload({**good, "params": {**good["params"], field: value}})


def _age(store: JobStore, job_id: str, idem: str | None = None, left_s: int = 5) -> None:
    """Make a job look created long ago: little of its creation-time TTL is left."""
    for key in (Keys.job(job_id), Keys.preview(job_id), idem):
        if key:
            store.r.expire(key, left_s)


def test_canceled_job_stays_readable_for_result_ttl(store: JobStore) -> None:
    """Issue 14 item 15: the TTL is refreshed when a job ends canceled."""
    queued, _ = store.create_job(params(1), idempotency=("promptpix:idem:t:1", "h"))
    running, _ = store.create_job(params(2))
    assert store.claim(running, rq_job_id(running, 1), "w1", MODEL) == "ok"
    store.write_progress(running, 1, "w1", 0.5, b"png")
    for job_id in (queued, running):
        _age(store, job_id, "promptpix:idem:t:1" if job_id == queued else None)
        assert store.cancel(job_id) == "ok"
        assert store.r.ttl(Keys.job(job_id)) > store.settings.result_ttl - 10
    assert store.r.ttl("promptpix:idem:t:1") > store.settings.result_ttl - 10
    assert store.r.ttl(Keys.preview(running)) > store.settings.result_ttl - 10


def test_reaper_failed_job_stays_readable_for_result_ttl(store: JobStore) -> None:
    job_id, _ = store.create_job(params(), idempotency=("promptpix:idem:t:2", "h"))
    store.r.lrem(store.queue.key, 0, rq_job_id(job_id, 1))
    for attempt, worker in ((1, "w1"), (2, "w2")):  # max_retries=1: the second loss fails it
        beat(store, worker, job_id)
        assert store.claim(job_id, rq_job_id(job_id, attempt), worker, MODEL) == "ok"
        store.r.lrem(store.queue.key, 0, rq_job_id(job_id, attempt + 1))
        store.r.delete(Keys.worker(worker))
        if attempt == 2:
            _age(store, job_id, "promptpix:idem:t:2")
        store.reap()
    assert store.get(job_id).error_code == "worker_lost"
    assert store.r.ttl(Keys.job(job_id)) > store.settings.result_ttl - 10
    assert store.r.ttl("promptpix:idem:t:2") > store.settings.result_ttl - 10


def test_caller_cap_counts_waiting_jobs_only(redis_url: str) -> None:
    """Issue 14 item 10: a started, canceled or handed-back job frees or keeps no slot."""
    from worker.protocol import QuotaExceeded

    s = Settings(redis_url=redis_url, max_queued_per_key=2, max_retries=5)
    store = JobStore(redis.Redis.from_url(redis_url), s, model="m1")
    a, _ = store.create_job(params(1), quota_who="key:x")
    b, _ = store.create_job(params(2), quota_who="key:x")
    with pytest.raises(QuotaExceeded):
        store.create_job(params(3), quota_who="key:x")
    store.create_job(params(3), quota_who="key:y")  # another caller
    assert store.claim(a, rq_job_id(a, 1), "w1", MODEL) == "ok"  # started: slot freed
    c, _ = store.create_job(params(4), quota_who="key:x")
    assert store.cancel(c) == "ok"  # canceled: slot freed
    d, _ = store.create_job(params(5), quota_who="key:x")
    # `a` handed back to the queue (worker lost) is not admitted again: no slot taken...
    assert store.requeue(a, 1, "w1", lost=True) == "requeued"
    with pytest.raises(QuotaExceeded):  # ...b and d wait: the cap of 2 is reached
        store.create_job(params(6), quota_who="key:x")
    assert {b, d} == {j.decode() for j in store.r.zrange(Keys.queued_by("key:x"), 0, -1)}


def test_admitted_job_without_queue_entry_is_enqueued_by_the_reaper(store: JobStore) -> None:
    """A queued job whose RQ entry went missing is not left behind forever."""
    job_id, _ = store.create_job(params())
    store.r.delete(f"rq:job:{rq_job_id(job_id, 1)}")
    store.r.lrem(store.queue.key, 0, rq_job_id(job_id, 1))
    store.r.zadd(Keys.queued, {job_id: time.time() - 60})  # admitted a minute ago
    assert store.reap_orphans() == [
        (job_id, "enqueued (admitted, its queue entry never written)")]
    again = store.get(job_id)
    assert again is not None and again.attempt == 2
    assert store.queue_position(again) == 0
    assert store.get(job_id).attempt == 2


def test_reaper_and_orphan_sweep_requeue_on_the_job_s_own_model_queue(redis_url: str) -> None:
    """Issue 17 phase B: a lost worker's job, and an entry taken but never claimed, go back
    to the queue of the model they asked for, whichever process sweeps."""
    s = Settings(redis_url=redis_url, heartbeat_interval=0.1, reaper_interval=0.05,
                 max_retries=3, models="m1,m2")
    r = redis.Redis.from_url(redis_url)
    api = JobStore(r, s)  # the API: serves no model
    w2 = JobStore(r, s, model="m2")
    lost, _ = api.create_job(GenerationParams(prompt="a red square", seed=1, model="m2"))
    taken, _ = api.create_job(GenerationParams(prompt="a red square", seed=2, model="m2"))
    assert r.llen("rq:queue:generate:m2") == 2 and r.llen("rq:queue:generate:m1") == 0
    r.lrem(w2.queue.key, 0, rq_job_id(lost, 1))  # popped by m2's worker, which claims it
    assert w2.claim(lost, rq_job_id(lost, 1), "w2", MODEL) == "ok"  # ... then dies
    r.lmove(w2.queue.key, w2.queue.intermediate_queue_key)  # the other: taken, never claimed
    assert [j for j, _ in api.reap()] == [lost]
    assert api.reap_orphans() == []  # first sight of the taken entry
    time.sleep(0.35)
    assert [j for j, _ in api.reap_orphans()] == [taken]
    assert r.llen("rq:queue:generate:m1") == 0
    assert set(r.lrange("rq:queue:generate:m2", 0, -1)) == {
        rq_job_id(lost, 2).encode(), rq_job_id(taken, 2).encode()}
    for job_id in (lost, taken):
        job = api.get(job_id)
        assert job is not None and api.queue_position(job) is not None
    assert api.queue_depths() == {"m1": 0, "m2": 2}


def test_the_lost_entry_sweep_walks_a_large_backlog_in_bounded_batches(
        store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each sweep checks at most NEVER_ENQUEUED_BATCH queued jobs, resuming where the last
    one stopped, so a job deep in a large backlog is still found (in a later sweep)."""
    monkeypatch.setattr(liveness, "NEVER_ENQUEUED_BATCH", 3)
    ids = [store.create_job(params(n))[0] for n in range(7)]
    lost = ids[5]
    store.r.delete(f"rq:job:{rq_job_id(lost, 1)}")
    store.r.lrem(store.queue.key, 0, rq_job_id(lost, 1))
    for n, job_id in enumerate(ids):  # admitted a minute ago, oldest first
        store.r.zadd(Keys.queued, {job_id: time.time() - 60 + n})
    found = [store.reap_orphans() for _ in range(3)]  # jobs 0-2, 3-5, then 6
    assert found == [[], [(lost, "enqueued (admitted, its queue entry never written)")], []]
    assert store.get(lost).attempt == 2
    assert store.reap_orphans() == []  # wrapped around: nothing else is lost


def _sent(value: object) -> bytes:
    """A command argument as redis-py sends it (a str enum as its value)."""
    if isinstance(value, bytes):
        return value
    return value.encode() if isinstance(value, str) else repr(value).encode()


@pytest.mark.parametrize("kind", [JobKind.GENERATE, JobKind.SCORE])
def test_rq_entry_from_the_template_is_what_rq_writes(store: JobStore, kind: JobKind) -> None:
    """The admission's RQ entry (a template RQ recorded once, filled per job) is, command
    for command and field for field, what RQ's own enqueue writes for the same job: only
    RQ's two timestamps differ (its clock), and ours are in RQ's format at the job's time."""
    for n, hooks in enumerate((None, {"sleep_per_row": 0.01})):
        job_id, now = f"{n:032x}", time.time()
        params = {"prompt": "a red square", "seed": n, "model": "m1"}
        with store.r.pipeline(transaction=False) as recorder:
            store._enqueue(recorder, job_id, 1, params, hooks, at_front=False, kind=kind)
            theirs = [_sent(x) for a, _ in recorder.command_stack for x in (len(a), *a)]
        payload = {"job_id": job_id, "attempt": 1, "params": params,
                   **({"kind": kind.value} if kind is not JobKind.GENERATE else {}),
                   **({"test_hooks": hooks} if hooks else {})}
        ours = unpack(store._entry_template(params, kind).writes(job_id, now, payload))
        assert len(ours) == len(theirs)
        times = [i + 1 for i, x in enumerate(theirs) if x in (b"created_at", b"enqueued_at")]
        assert len(times) == 2
        for i in times:
            assert ours[i] == rq_time(now).encode()
            assert abs(utcparse(theirs[i].decode()).timestamp() - now) < 5
            ours[i] = theirs[i]
        data = theirs.index(b"data") + 1  # the same job, stored (not deflated) by us
        assert zlib.decompress(ours[data]) == zlib.decompress(theirs[data])
        ours[data] = theirs[data]
        assert ours == theirs


@pytest.mark.parametrize("size", [0, 1, 300, 0xFFFF, 0xFFFF + 1, 3 * 0xFFFF + 7])
def test_zlib_stored_is_a_zlib_stream(size: int) -> None:
    raw = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    assert zlib.decompress(zlib_stored(raw)) == raw


def test_admitted_rq_entry_reads_back_through_rq(store: JobStore) -> None:
    """A worker's RQ reads the admitted entry as the job it is: function, payload, queue."""
    job_id, _ = store.create_job(params(7), test_hooks={"sleep_per_row": 0.01})
    rq_id = rq_job_id(job_id, 1)
    job = Job.fetch(rq_id, connection=store.r, serializer=JSONSerializer)
    assert job.func_name == JOB_FUNC and job.origin == "generate:m1"
    assert job.get_status() == "queued" and job.timeout == store.settings.job_timeout
    assert job.args == [{"job_id": job_id, "attempt": 1,
                         "params": store.get(job_id).params,
                         "test_hooks": {"sleep_per_row": 0.01}}]
    assert store.queue.job_ids == [rq_id]
    assert 0 < store.r.ttl(job.key) <= store.settings.result_ttl
