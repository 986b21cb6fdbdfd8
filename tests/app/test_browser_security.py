"""DNS rebinding, browser headers, /docs without a CDN and trusted proxies, against a real
`promptpix serve` (uvicorn) on 127.0.0.1 and the session's real Redis."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.redis_server import free_port
from tests.worker.helpers import Proc, start_api

CSP = "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'"


class Api:
    def __init__(self, redis_url: str, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Proc = start_api(redis_url, self.port, log, **env)

    def get(self, path: str, **kw: object) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=10, **kw)  # type: ignore[arg-type]


@pytest.fixture
def api(redis_url: str, tmp_path: Path) -> Iterator[Api]:
    a = Api(redis_url, tmp_path / "api.log")
    yield a
    a.proc.stop()


def assert_browser_headers(resp: httpx.Response) -> None:
    assert resp.headers.get("content-security-policy") == CSP, (resp.request.url, resp.headers)
    assert resp.headers.get("x-content-type-options") == "nosniff"
    assert resp.headers.get("referrer-policy") == "no-referrer"


def test_a_rebound_host_name_is_refused_on_loopback(api: Api) -> None:
    # What a page on evil.example sends once its name resolves to 127.0.0.1.
    r = api.get("/v1/models", headers={"Host": f"evil.example:{api.port}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    assert_browser_headers(r)
    r = httpx.post(f"{api.url}/v1/generations", json={"prompt": "a red square"},
                   headers={"Host": "evil.example"}, timeout=10)
    assert r.status_code == 400
    for host in (f"localhost:{api.port}", f"127.0.0.1:{api.port}", "LOCALHOST", "[::1]:80"):
        assert api.get("/v1/models", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_setting(redis_url: str, tmp_path: Path) -> None:
    a = Api(redis_url, tmp_path / "a.log", PROMPTPIX_ALLOWED_HOSTS="promptpix.lan,127.0.0.1")
    b = Api(redis_url, tmp_path / "b.log", PROMPTPIX_ALLOWED_HOSTS="*")
    try:
        assert a.get("/healthz", headers={"Host": "promptpix.lan:8000"}).status_code == 200
        assert a.get("/healthz", headers={"Host": "127.0.0.1"}).status_code == 200
        assert a.get("/healthz", headers={"Host": "localhost"}).status_code == 400
        assert b.get("/healthz", headers={"Host": "anything.example"}).status_code == 200
    finally:
        a.proc.stop()
        b.proc.stop()


def test_every_answer_carries_the_browser_headers(api: Api) -> None:
    answers = [
        api.get("/"), api.get("/static/app.js"), api.get("/docs"), api.get("/openapi.json"),
        api.get("/healthz"), api.get("/metrics"), api.get("/v1/models"),
        api.get("/v1/generations/" + "0" * 32), api.get("/nowhere"),
        httpx.post(f"{api.url}/v1/generations", content=b"{", timeout=10,
                   headers={"Content-Type": "application/json"}),
        httpx.post(f"{api.url}/v1/images/generations", content=b"x" * 70_000, timeout=10),
    ]
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 200, 200, 200, 404, 404,
                                                 422, 413]
    for r in answers:
        assert_browser_headers(r)


def test_docs_load_nothing_from_another_origin(api: Api) -> None:
    page = api.get("/docs").text
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all(ref.startswith("/") and not ref.startswith("//") for ref in refs), refs
    assert "<script>" not in page and "<style" not in page  # CSP forbids inline code
    for ref in refs:
        r = api.get(ref)
        assert r.status_code == 200 and len(r.content) > 100, ref
        assert_browser_headers(r)


def _bucket_of(api: Api, forwarded_for: str) -> int:
    return httpx.get(f"{api.url}/v1/models", headers={"X-Forwarded-For": forwarded_for},
                     timeout=10).status_code


def test_forwarded_for_is_believed_only_from_trusted_proxies(redis_url: str,
                                                              tmp_path: Path) -> None:
    """With the default (trust loopback) a same-host proxy's X-Forwarded-For names the
    rate-limit bucket; with PROMPTPIX_FORWARDED_ALLOW_IPS="" the header is ignored."""
    trusting = Api(redis_url, tmp_path / "t.log", PROMPTPIX_RATE_LIMIT="2")
    try:
        assert [_bucket_of(trusting, "203.0.113.1") for _ in range(3)] == [200, 200, 429]
        assert _bucket_of(trusting, "203.0.113.2") == 200  # another client, another bucket
    finally:
        trusting.proc.stop()
    trusting_none = Api(redis_url, tmp_path / "n.log", PROMPTPIX_RATE_LIMIT="2",
                        PROMPTPIX_FORWARDED_ALLOW_IPS="")
    try:
        assert [_bucket_of(trusting_none, f"198.51.100.{i}") for i in range(3)] == [200, 200, 429]
    finally:
        trusting_none.proc.stop()
