"""`promptpix submit` against a hostile server (a real uvicorn serving a small lying app):
job ids that are paths are refused before any file is named, and image URLs on another
origin are never fetched, so the API key never leaves the server's origin."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app import client
from app.redis_server import free_port

API_KEY = "submit-hostile-key-0123456789"
GOOD_ID = "0123456789abcdef0123456789abcdef"


class Served:
    """A Starlette app on a real uvicorn in a thread; records the Authorization it got."""

    def __init__(self, routes: list[Route]) -> None:
        self.auth: list[str | None] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=routes)

        async def record(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                headers = dict(scope["headers"])
                auth = headers.get(b"authorization")
                self.auth.append(auth.decode() if auth else None)
            await app(scope, receive, send)

        self.server = uvicorn.Server(uvicorn.Config(record, port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "test server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def lying_api(job_id: str, images: list[str]) -> list[Route]:
    async def submit(request: Request) -> JSONResponse:
        return JSONResponse({"id": job_id, "status": "queued", "seed": 1,
                             "status_url": f"/v1/generations/{job_id}"}, status_code=202)

    async def status(request: Request) -> JSONResponse:
        return JSONResponse({"id": job_id, "status": "succeeded", "progress": 1.0,
                             "images": images})

    async def png(request: Request) -> Response:
        return Response(b"\x89PNG fake", media_type="image/png")

    return [Route("/v1/generations", submit, methods=["POST"]),
            Route("/v1/generations/{rest:path}", status),
            Route("/img/{n}.png", png)]


@pytest.fixture
def elsewhere() -> Iterator[Served]:
    s = Served([Route("/{p:path}", lambda r: Response(b"\x89PNG stolen"))])
    yield s
    s.stop()


def run_submit(url: str, out: Path) -> int:
    return client.main(["a red square", "--wait", "--quiet", "--out", str(out), "--url", url,
                        "--api-key", API_KEY, "--timeout", "10"])


@pytest.mark.parametrize("bad_id", ["../../../tmp/pwned", "/etc/cron.d/x", "a" * 33,
                                    GOOD_ID.upper(), ""])
def test_a_job_id_that_is_not_an_id_is_refused(bad_id: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    server = Served(lying_api(bad_id, ["/img/0.png"]))
    try:
        out = tmp_path / "out"
        assert run_submit(server.url, out) == 1
        assert "malformed job id" in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.parent.rglob("pwned*"))
        assert len(server.auth) == 1  # the submission only; nothing polled or fetched
    finally:
        server.stop()


def test_the_key_is_never_sent_to_another_origin(elsewhere: Served, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    server = Served(lying_api(GOOD_ID, ["/img/0.png", f"{elsewhere.url}/steal.png"]))
    try:
        assert run_submit(server.url, tmp_path) == 1
        assert "another origin" in capsys.readouterr().err
        assert elsewhere.auth == []  # never even connected to
        assert server.auth and all(a == f"Bearer {API_KEY}" for a in server.auth)
        assert (tmp_path / f"{GOOD_ID}-0.png").read_bytes() == b"\x89PNG fake"
    finally:
        server.stop()


def test_same_origin_urls_are_fetched(tmp_path: Path) -> None:
    server = Served(lying_api(GOOD_ID, ["/img/0.png", "img/1.png"]))
    try:
        assert run_submit(server.url, tmp_path) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"{GOOD_ID}-0.png",
                                                              f"{GOOD_ID}-1.png"]
    finally:
        server.stop()
