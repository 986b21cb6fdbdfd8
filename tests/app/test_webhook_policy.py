"""Webhook submissions (issue 17 phase B): refused without a secret, and the address
policy (PROMPTPIX_WEBHOOK_ALLOW, default public only) tested with IP literals."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app.webhook_policy import WebhookRejected, address_allowed, resolve
from app.webhook_sender import Sender
from worker.protocol import GenerationParams, JobStore, Settings, redis_connection

from .conftest import VALID

SECRET = "whsec_dGVzdC1zZWNyZXQtZm9yLXdlYmhvb2tz"


def test_webhook_without_a_secret_is_422(client: TestClient) -> None:
    r = client.post("/v1/generations", json={**VALID, "webhook": "https://93.184.216.34/h"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "webhooks_disabled", r.text


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/h", "http://[::1]/h", "http://10.1.2.3/h", "http://192.168.0.5/h",
    "http://172.16.0.1/h", "http://169.254.169.254/latest/meta-data", "http://[fe80::1]/h",
    "http://[::ffff:127.0.0.1]/h", "http://0.0.0.0/h", "http://100.64.0.1/h",
    "ftp://93.184.216.34/h", "http://user:pw@93.184.216.34/h", "not a url",
    # Malformed hosts: urlsplit raises ValueError, getaddrinfo UnicodeError (no DNS form).
    "http://[::1", "http://[foo]/h", "http://a..b/h", "http://" + "a" * 64 + ".com/h",
])
def test_default_policy_refuses_internal_addresses(
        make_client: Callable[..., TestClient], url: str) -> None:
    client = make_client(webhook_secret=SECRET)
    r = client.post("/v1/generations", json={**VALID, "webhook": url})
    assert r.status_code == 422 and r.json()["error"]["code"] == "webhook_not_allowed", r.text
    assert r.json()["error"]["field"] == "webhook"


def test_public_address_accepted_and_shown_in_the_view(
        make_client: Callable[..., TestClient]) -> None:
    client = make_client(webhook_secret=SECRET)
    r = client.post("/v1/generations", json={**VALID, "webhook": "https://93.184.216.34/h",
                                             "webhook_events_filter": ["completed"]})
    assert r.status_code == 202, r.text
    view = client.get(f"/v1/generations/{r.json()['id']}").json()
    assert view["webhook"] == {"delivered": False, "attempts": 0, "last_status": None}
    assert "webhook" not in view["params"]
    r = client.post("/v1/generations", json={**VALID, "webhook": "https://93.184.216.34/h",
                                             "webhook_events_filter": ["output"]})
    assert r.status_code == 422, r.text


def test_loopback_allowed_explicitly() -> None:
    assert address_allowed("127.0.0.1", "127.0.0.0/8")
    assert address_allowed("::ffff:127.0.0.1", "127.0.0.0/8")  # mapped: judged as IPv4
    assert not address_allowed("127.0.0.1", "public")
    assert address_allowed("8.8.8.8", "public") and not address_allowed("8.8.8.8", "10.0.0.0/8")
    assert address_allowed("10.0.0.7", "public,10.0.0.0/8")
    assert resolve("http://127.0.0.1:8080/x", "127.0.0.0/8") == ("127.0.0.1", 8080)
    with pytest.raises(WebhookRejected, match=r"127\.0\.0\.1"):
        resolve("http://localhost:8080/x", "public")  # a name resolving inside: refused


def test_sender_survives_a_stored_host_name_dns_cannot_take(redis_url: str) -> None:
    # A job admitted before the API refused such names: its delivery is a refused attempt,
    # not an exception that kills `promptpix webhooks` (and kills it again on every
    # restart, when the unacknowledged entry is claimed anew).
    settings = Settings(redis_url=redis_url, models="tiny", webhook_secret=SECRET)
    store = JobStore(redis_connection(settings), settings)
    job_id, _ = store.create_job(GenerationParams(prompt="a", model="tiny", seed=1),
                                 webhook=("http://a..b/h", ["completed"]))
    assert store.cancel(job_id) == "ok"
    sender = Sender(store, settings)
    sender.ensure_group()
    try:
        assert sender.step() == 1
    finally:
        sender.close()
    job = store.get(job_id)
    assert job is not None and job.webhook_attempts == 1 and not job.webhook_delivered
