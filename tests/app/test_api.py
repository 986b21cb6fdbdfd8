"""API behaviour over a real Redis (no worker): queue, idempotency, cancel, keys, limits."""

from __future__ import annotations

import json
import logging
import re
import time
import zlib

import redis
from fastapi.testclient import TestClient

from app.redis_server import RedisServer, free_port
from tests.app.conftest import VALID
from tests.app.test_validation import error_of
from worker.protocol import Keys, queue_name

URL = "/v1/generations"
KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"


def test_submit_and_poll_queued(client: TestClient, redis_url: str) -> None:
    r = client.post(URL, json={**VALID, "num_images": 2})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == job["status_url"] == f"{URL}/{job['id']}"
    assert job["status"] == "queued" and job["seed"] == 7
    view = client.get(job["status_url"]).json()
    assert view["status"] == "queued" and view["queue_position"] == 0
    assert view["attempt"] == 1 and view["progress"] == 0.0 and view["images"] == []
    assert view["params"]["num_images"] == 2 and view["params"]["seed"] == 7
    assert view["prompt"] == VALID["prompt"] and view["model"] is None
    assert re.match(r"\d{4}-\d\d-\d\dT.*Z$", view["created_at"])
    second = client.post(URL, json=VALID).json()
    assert client.get(second["status_url"]).json()["queue_position"] == 1
    # The payload is JSON (never pickle) and names the job function by path.
    raw = redis.Redis.from_url(redis_url).hget(f"rq:job:{job['id']}-a1", "data")
    data = json.loads(zlib.decompress(raw))  # RQ compresses; JSONSerializer inside
    assert data[0] == "worker.jobs.generate" and data[2][0]["job_id"] == job["id"]


def test_seed_drawn_when_null(client: TestClient) -> None:
    seeds = {client.post(URL, json={"prompt": "x"}).json()["seed"] for _ in range(3)}
    assert len(seeds) == 3 and all(0 <= s < 2**53 for s in seeds)


def test_idempotency(client: TestClient) -> None:
    h = {"Idempotency-Key": "abc-123"}
    first = client.post(URL, json=VALID, headers=h)
    again = client.post(URL, json=dict(reversed(list(VALID.items()))), headers=h)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    error_of(client.post(URL, json={**VALID, "seed": 8}, headers=h), 409, "idempotency_conflict")
    other = client.post(URL, json=VALID, headers={"Idempotency-Key": "other"})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    error_of(client.post(URL, json=VALID, headers={"Idempotency-Key": "x" * 300}), 422,
             "invalid_request")


def test_cancel_queued(client: TestClient, redis_url: str) -> None:
    job = client.post(URL, json=VALID).json()
    r = client.delete(job["status_url"])
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert r.json()["finished_at"] is not None
    assert redis.Redis.from_url(redis_url).llen(f"rq:queue:{queue_name('tiny')}") == 0
    error_of(client.delete(job["status_url"]), 409, "not_cancelable")
    assert client.get(job["status_url"]).json()["status"] == "canceled"


def test_api_keys(make_client) -> None:
    c = make_client(api_keys=f"{KEY_A},{KEY_B}", metrics_public=False)
    error_of(c.post(URL, json=VALID), 401, "unauthorized")
    error_of(c.post(URL, json=VALID, headers={"Authorization": "Bearer wrong-key-123"}), 401,
             "unauthorized")
    error_of(c.get("/v1/models"), 401, "unauthorized")
    error_of(c.get("/metrics"), 401, "unauthorized")
    a = {"Authorization": f"Bearer {KEY_A}"}
    b = {"Authorization": f"Bearer {KEY_B}"}
    job = c.post(URL, json=VALID, headers=a).json()
    assert c.get(job["status_url"], headers=a).status_code == 200
    error_of(c.get(job["status_url"], headers=b), 404, "not_found")
    error_of(c.delete(job["status_url"], headers=b), 404, "not_found")
    # Idempotency keys are scoped per API key.
    h = {"Idempotency-Key": "k1"}
    ja = c.post(URL, json=VALID, headers={**a, **h}).json()["id"]
    jb = c.post(URL, json={**VALID, "seed": 1}, headers={**b, **h})
    assert jb.status_code == 202 and jb.json()["id"] != ja
    for path in ("/healthz", "/docs", "/openapi.json"):
        assert c.get(path).status_code == 200, path
    assert c.get("/metrics", headers=a).status_code == 200
    assert make_client(api_keys=KEY_A).get("/metrics").status_code == 200  # public by default


def test_keys_not_in_logs_or_redis(make_client, redis_url: str, caplog) -> None:
    c = make_client(api_keys=KEY_A)
    c.post(URL, json=VALID, headers={"Authorization": f"Bearer {KEY_A}"})
    dump = b"".join(k + repr(redis.Redis.from_url(redis_url).dump(k)).encode()
                    for k in redis.Redis.from_url(redis_url).keys("*"))
    assert KEY_A.encode() not in dump
    assert KEY_A not in caplog.text


def test_redis_password_in_the_url_query_not_in_logs(caplog) -> None:
    # redis-py takes the password from the query too (`?password=`); the URL logged at
    # start-up ("API up: Redis ...") must mask it there as in `redis://:pw@host`.
    from app.main import create_app
    from worker.protocol import Settings

    password = "pw-Tq7rX2vLm9Kc"
    server = RedisServer(password=password).start()
    caplog.set_level(logging.INFO)
    try:
        url = f"redis://127.0.0.1:{server.port}/0?password={password}"
        with TestClient(create_app(Settings(redis_url=url, models="tiny"))) as c:
            assert c.post(URL, json=VALID).status_code == 202
        assert "API up: Redis redis://" in caplog.text
        assert password not in caplog.text
    finally:
        server.cleanup()


def test_rate_limit(make_client) -> None:
    c = make_client(rate_limit=3)
    codes = [c.get(f"{URL}/{'0' * 32}").status_code for _ in range(4)]
    assert codes == [404, 404, 404, 429]
    r = c.post(URL, json=VALID)
    error_of(r, 429, "rate_limited")
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert c.get("/healthz").status_code == 200  # not a /v1 route


def test_rate_limit_per_key(make_client) -> None:
    c = make_client(rate_limit=2, api_keys=f"{KEY_A},{KEY_B}")
    a = {"Authorization": f"Bearer {KEY_A}"}
    b = {"Authorization": f"Bearer {KEY_B}"}
    assert [c.get("/v1/models", headers=a).status_code for _ in range(3)] == [200, 200, 429]
    assert c.get("/v1/models", headers=b).status_code == 200


def test_queue_full(make_client) -> None:
    c = make_client(max_queue=2)
    assert [c.post(URL, json=VALID).status_code for _ in range(2)] == [202, 202]
    r = c.post(URL, json=VALID)
    error_of(r, 429, "queue_full")
    assert int(r.headers["retry-after"]) > 0


def test_no_model_registered_yet_is_503_not_a_client_error(make_client, redis_url: str
                                                            ) -> None:
    """Before any worker registered a model (or after a Redis restart without persistence,
    until the next heartbeat registers it again), submissions are 503 with Retry-After,
    not 422 `model_required`; once a model is registered they are accepted, at once."""
    c = make_client(models="")
    for body in (VALID, {**VALID, "model": "tiny"}):
        r = c.post(URL, json=body)
        err = error_of(r, 503, "unavailable")
        assert "no model is registered yet" in err["message"] and r.headers["retry-after"]
    redis.Redis.from_url(redis_url).hset(Keys.models, "tiny", json.dumps({"id": "tiny"}))
    assert c.post(URL, json=VALID).status_code == 202


def test_readyz_without_worker(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    err = error_of(r, 503, "unavailable")
    assert "worker" in err["message"] and r.headers["retry-after"]
    # The API itself is ready whenever Redis answers (its own probes must not need workers).
    assert client.get("/readyz?scope=api").json()["status"] == "ready"
    # A declared model is listed, with no worker and no facts yet.
    models = client.get("/v1/models").json()
    assert [(m["id"], m["workers"], m["image_size"]) for m in models["data"]] == [
        ("tiny", 0, None)]


def test_metrics_names_and_counters(client: TestClient) -> None:
    def value(text: str, name: str) -> float:
        found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith(name) and not line.startswith("#")]
        return sum(found)

    before = client.get("/metrics").text
    client.post(URL, json=VALID)
    client.get(f"{URL}/{'0' * 32}")
    text = client.get("/metrics").text
    for name in ("promptpix_http_requests_total", "promptpix_http_request_duration_seconds",
                 "promptpix_jobs_submitted_total", "promptpix_queue_depth", "promptpix_workers"):
        assert name in text, name
    assert value(text, "promptpix_jobs_submitted_total") == \
        value(before, "promptpix_jobs_submitted_total") + 1
    assert 'route="/v1/generations/{job_id}"' in text
    assert value(text, "promptpix_queue_depth") == 1
    assert 'le="600.0"' in text


def test_redis_down_503_then_recovers() -> None:
    port = free_port()
    server = RedisServer(port=port).start()
    from app.main import create_app
    from worker.protocol import Settings

    try:
        with TestClient(create_app(Settings(redis_url=server.url, models="tiny"))) as c:
            assert c.post(URL, json=VALID).status_code == 202
            server.stop()
            for call in (lambda: c.post(URL, json=VALID), lambda: c.get(f"{URL}/{'0' * 32}"),
                         lambda: c.get("/readyz"), lambda: c.get("/v1/models")):
                r = call()
                error_of(r, 503, "unavailable")
                assert int(r.headers["retry-after"]) > 0
            assert c.get("/healthz").status_code == 200
            assert c.get("/metrics").status_code == 200  # still serves HTTP figures
            server = RedisServer(port=port).start()
            deadline = time.monotonic() + 10
            while c.post(URL, json=VALID).status_code != 202:
                assert time.monotonic() < deadline, "API did not recover"
                time.sleep(0.1)
    finally:
        server.cleanup()


def test_web_page(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert client.get("/static/style.css").status_code == 200


def test_keys_hashes_only(redis_url: str) -> None:
    assert Keys.idempotency("s", KEY_A).split(":")[-1] != KEY_A
