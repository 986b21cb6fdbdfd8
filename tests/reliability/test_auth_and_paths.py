"""API keys on: what answers without a key, keys never in logs, constant-time comparison;
path traversal sent over a real socket (no client library normalising `..`)."""

from __future__ import annotations

import inspect
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.routing import Mount

from app.redis_server import RedisServer, free_port
from tests.app.conftest import VALID
from tests.worker.helpers import (
    ROOT,
    Proc,
    base_env,
    finished,
    poll_job,
    start_api,
    start_worker,
    wait_worker_ready,
)

KEY = "rel-key-Zq8vN3xW5pL1"
OTHER = "rel-other-Hk2mB7cD9sF4"
AUTH = {"Authorization": f"Bearer {KEY}"}
# What may answer without a key (they carry no data); /metrics only when public.
PUBLIC = {"/healthz", "/readyz", "/", "/docs", "/docs/oauth2-redirect", "/openapi.json",
          # Signed, expiring image URLs (response_format "url"): the signature is the key.
          "/v1/images/files/{job_id}/{n}.png"}


def _concrete(path: str) -> str:
    return (path.replace("{job_id}", "0" * 32).replace("{n}", "0"))


def _operations(c: TestClient) -> set[tuple[str, str]]:
    """(method, path) of every operation: the OpenAPI schema's, plus routes left out of it."""
    ops = {(m.upper(), p) for p, item in c.get("/openapi.json").json()["paths"].items()
           for m in item}

    def walk(routes: list) -> None:
        for route in routes:
            if isinstance(route, Mount):
                # The web page's files and Swagger UI's (from the fastapi-offline package).
                assert route.path in ("/static", "/swagger-ui"), route.path
            elif getattr(route, "methods", None) and getattr(route, "path", None):
                ops.update((m, route.path) for m in route.methods - {"HEAD"})
            walk(getattr(route, "routes", None) or [])

    walk(c.app.routes)
    return ops


@pytest.mark.parametrize("metrics_public", [True, False])
def test_only_public_routes_answer_without_a_key(make_client, metrics_public: bool) -> None:
    c: TestClient = make_client(api_keys=f"{KEY},{OTHER}", metrics_public=metrics_public,
                                rate_limit=0, auth_failure_limit=0)
    public = PUBLIC | ({"/metrics"} if metrics_public else set())
    ops = _operations(c)
    assert {p for _, p in ops if p.startswith("/v1")} >= {
        "/v1/generations", "/v1/generations/{job_id}", "/v1/generations/{job_id}/images/{n}.png",
        "/v1/generations/{job_id}/preview.png", "/v1/models"}
    assert c.get("/static/style.css").status_code == 200
    for method, path in sorted(ops):
        kwargs = {"json": VALID} if method == "POST" else {}
        for headers in ({}, {"Authorization": "Bearer not-a-key-123"},
                        {"Authorization": f"Basic {KEY}"}, {"X-API-Key": KEY},
                        {"Authorization": f"Bearer {KEY[:-1]}"}):
            r = c.request(method, _concrete(path), headers=headers, **kwargs)
            if path in public:
                assert r.status_code != 401, (method, path)
            else:
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.json()["error"]["code"] == "unauthorized"
                assert r.headers["www-authenticate"] == "Bearer"


def test_key_comparison_is_constant_time() -> None:
    from app import deps

    src = inspect.getsource(deps.check_api_key)
    assert "hmac.compare_digest" in src
    # No short-circuit lookups of the presented key.
    assert not re.search(r"given\s*(==|!=|in)\s", src), src
    assert not re.search(r"\bin\s+keys\b", src.replace("for key in keys", "")), src
    # Job ownership compares key hashes the same way.
    assert "compare_digest" in inspect.getsource(deps.owned_job)


@pytest.mark.parametrize("program", ["app.serve", "worker.runtime"])
def test_invalid_key_setting_does_not_echo_keys(program: str) -> None:
    """A bad PROMPTPIX_API_KEYS or REDIS_URL is refused naming the entry, not its value."""
    env = base_env("http://:redis-pass-SECRET9@127.0.0.1:1/0",
                   PROMPTPIX_API_KEYS=f"{KEY},short", PROMPTPIX_CHECKPOINT="x.pth")
    out = subprocess.run([sys.executable, "-m", program], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "PROMPTPIX_API_KEYS" in out.stderr and "entry 1" in out.stderr
    assert "PROMPTPIX_REDIS_URL" in out.stderr
    assert KEY not in out.stderr + out.stdout
    assert "redis-pass-SECRET9" not in out.stderr + out.stdout


def test_keys_shorter_than_16_characters_are_refused_at_startup() -> None:
    fifteen = "k" * 15
    env = base_env("redis://127.0.0.1:1/0", PROMPTPIX_API_KEYS=f"{KEY},{fifteen}")
    out = subprocess.run([sys.executable, "-m", "app.serve"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "entry 1 has 15 characters" in out.stderr and "at least 16" in out.stderr
    assert "secrets.token_urlsafe(32)" in out.stderr  # how to make a good one
    assert fifteen not in out.stderr + out.stdout


def test_failed_authentications_are_limited_per_address(redis_url: str, tmp_path: Path) -> None:
    """Over PROMPTPIX_AUTH_FAILURE_LIMIT failures a minute, an address gets 429 for wrong
    keys; right keys from that same address keep working (real uvicorn, real Redis)."""
    port = free_port()
    api = start_api(redis_url, port, tmp_path / "api.log", PROMPTPIX_API_KEYS=f"{KEY},{OTHER}",
                    PROMPTPIX_AUTH_FAILURE_LIMIT="5", PROMPTPIX_RATE_LIMIT="0")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as h:
            wrong = [h.get("/v1/models", headers={"Authorization": f"Bearer guess-{i:012d}"})
                     for i in range(5)]
            assert [r.status_code for r in wrong] == [401] * 5
            assert h.get("/v1/models").status_code == 429  # no key at all counts too
            refused = h.get("/v1/models", headers={"Authorization": f"Bearer {KEY}x"})
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "auth_rate_limited"
            assert 0 < int(refused.headers["Retry-After"]) <= 60
            for key in (KEY, OTHER):
                assert h.get("/v1/models", headers={"Authorization": f"Bearer {key}"}) \
                    .status_code == 200
            # A request from another address (a trusted proxy's client) is not affected.
            other = h.get("/v1/models", headers={"Authorization": f"Bearer {KEY}x",
                                                 "X-Forwarded-For": "203.0.113.9"})
            assert other.status_code == 401
        assert "over 5 failed authentications a minute from 127.0.0.1" in api.log()
    finally:
        api.stop()


class KeyedStack:
    """Redis, an API with keys on (INFO logs + access log) and a worker that has the keys
    in its environment too (as compose's shared .env gives it)."""

    def __init__(self, tmp: Path, checkpoint: Path) -> None:
        self.tmp = tmp
        self.redis = RedisServer().start()
        self.port = free_port()
        keys = {"PROMPTPIX_API_KEYS": f"{KEY},{OTHER}", "PROMPTPIX_RATE_LIMIT": "0",
                "PROMPTPIX_METRICS_PUBLIC": "false"}
        self.api = start_api(self.redis.url, self.port, tmp / "api.log", log_level="debug",
                             access_log=True, **keys)
        self.worker: Proc = start_worker(self.redis.url, checkpoint, tmp / "worker.log", **keys)
        wait_worker_ready(self.redis.url, self.worker)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        job = self.http.post("/v1/generations", json={"prompt": "a red square", "seed": 1},
                             headers=AUTH)
        assert job.status_code == 202, job.text
        self.job = poll_job(self.http, job.json()["id"], finished, headers=AUTH)
        assert self.job["status"] == "succeeded", self.job

    def close(self) -> None:
        self.http.close()
        self.worker.stop()
        self.api.stop()
        self.redis.cleanup()

    def raw(self, request_line: str, headers: str = "") -> tuple[int, bytes]:
        """Send one request exactly as written; return (status, body)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(f"{request_line}\r\nHost: 127.0.0.1\r\n{headers}Connection: close"
                      "\r\n\r\n".encode("latin-1"))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[KeyedStack]:
    s = KeyedStack(tmp_path_factory.mktemp("keyed"), tiny_checkpoint)
    try:
        yield s
    finally:
        s.close()


def test_keys_never_in_logs_of_a_real_run(keyed: KeyedStack) -> None:
    h = keyed.http
    assert h.get("/readyz").status_code == 200
    assert h.get("/v1/models").status_code == 401
    assert h.get("/v1/models", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
    assert h.get("/metrics").status_code == 401
    assert h.get("/metrics", headers=AUTH).status_code == 200
    done = keyed.job
    assert h.get(done["images"][0], headers=AUTH).status_code == 200
    assert h.get(done["images"][0],
                 headers={"Authorization": f"Bearer {OTHER}"}).status_code == 404
    logs = keyed.api.log() + keyed.worker.log()
    assert "GET /v1/models" in logs  # the access log is on, so this grep means something
    for secret in (KEY, OTHER, KEY[:12], KEY[-12:]):
        assert secret not in logs, secret


@pytest.mark.parametrize("path", [
    "/v1/generations/{id}/images/../../x.png",
    "/v1/generations/{id}/images/..%2f..%2fx.png",
    "/v1/generations/{id}/images/%2e%2e%2f%2e%2e%2fx.png",
    "/v1/generations/{id}/images/..%252f..%252fx.png",
    "/v1/generations/{id}/images/0.png%00.txt",
    "/v1/generations/{id}/images/..\\..\\x.png",
    "/v1/generations/{id}/images/-1.png",
    "/v1/generations/{id}/images/18446744073709551617.png",
    "/v1/generations/../../../../etc/passwd",
    "/v1/generations/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/../../app/main.py",
    "/static/%2e%2e/%2e%2e/app/main.py",
    "/static/..%2f..%2fapp%2fmain.py",
    "/static/....//....//app/main.py",
    "/static//etc/passwd",
    "/static/%00",
    "//etc/passwd",
    "/../../../../etc/passwd",
])
def test_path_traversal_over_a_socket(keyed: KeyedStack, path: str) -> None:
    job = keyed.job
    status, body = keyed.raw(f"GET {path.replace('{id}', job['id'])} HTTP/1.1",
                             f"Authorization: Bearer {KEY}\r\n")
    assert status in (400, 404, 422), (path, status, body[:200])
    assert b"create_app" not in body and b"root:" not in body
    if status != 400:  # 400 is h11 refusing the request line before the app sees it
        assert body.startswith(b'{"error":'), body[:200]
