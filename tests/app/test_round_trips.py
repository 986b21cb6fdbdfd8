"""The hot path's Redis round trips, counted with MONITOR on the real test Redis.

A status GET is one command (the STATUS script: job hash and queue position), a
submission one (ADMIT: admission, job hash and RQ entry), plus the registry read when the
model facts are not cached; the rate limit adds one pipelined INCRBY + EXPIRE. Commands are
counted, never timed, so load on the machine cannot change the answer. Only the commands
of the API's asyncio connections count (found in CLIENT LIST after a warm-up GET), so the
reaper's own sweep cannot land in the window.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from fastapi.testclient import TestClient

from .conftest import VALID


@contextmanager
def monitored(url: str, ours: set[str]) -> Iterator[list[str]]:
    """The names of the commands the connections at `ours` ('ip:port') send while the
    block runs (filled in when it ends); commands run inside scripts are not round trips
    and not listed."""
    r = redis.Redis.from_url(url, decode_responses=True)
    marker = f"round-trips-{uuid.uuid4().hex}"
    seen: list[dict[str, Any]] = []
    ready = threading.Event()

    def watch() -> None:
        with r.monitor() as m:
            ready.set()
            markers = 0
            while markers < 2:  # the window is between our two ECHOs
                command = m.next_command()
                if marker in command["command"]:
                    markers += 1
                elif markers == 1:
                    seen.append(command)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert ready.wait(10)
    r.echo(marker)
    names: list[str] = []
    try:
        yield names
    finally:
        r.echo(marker)
        thread.join(30)
        names += [c["command"].split()[0].upper() for c in seen
                  if c["client_type"] == "tcp"
                  and f"{c['client_address']}:{c['client_port']}" in ours]


def api_connections(url: str) -> set[str]:
    """Addresses ('ip:port') of the connections whose last command ran a script: the API's
    asyncio client after a status GET (the reaper of an empty Redis runs none)."""
    clients = redis.Redis.from_url(url, decode_responses=True).client_list()
    return {c["addr"] for c in clients if c.get("cmd") == "evalsha"}


def _warm(client: TestClient) -> str:
    """Submit one job and read it (loads the scripts, RQ's server version, model facts)."""
    job_id = client.post("/v1/generations", json=VALID).json()["id"]
    assert client.get(f"/v1/generations/{job_id}").status_code == 200
    return str(job_id)


def test_status_get_and_post_are_one_round_trip_each(
        make_client: Callable[..., TestClient], redis_url: str) -> None:
    client = make_client(rate_limit=0, reaper_interval=3600)
    job_id = _warm(client)
    ours = api_connections(redis_url)
    assert ours
    with monitored(redis_url, ours) as get_commands:
        r = client.get(f"/v1/generations/{job_id}")
    assert r.status_code == 200 and r.json()["queue_position"] == 0
    assert get_commands == ["EVALSHA"]
    with monitored(redis_url, ours) as post_commands:
        r = client.post("/v1/generations", json={**VALID, "seed": 8})
    assert r.status_code == 202
    # The registry read only when the model facts' short cache has run out meanwhile.
    assert post_commands in (["EVALSHA"], ["HGETALL", "EVALSHA"])
    # The job and its RQ entry exist after that one step.
    job = client.get(r.headers["Location"]).json()
    assert job["status"] == "queued" and job["queue_position"] == 1


def test_the_rate_limit_adds_one_pipelined_count(
        make_client: Callable[..., TestClient], redis_url: str) -> None:
    client = make_client(rate_limit=100, reaper_interval=3600)
    job_id = _warm(client)
    ours = api_connections(redis_url)
    with monitored(redis_url, ours) as commands:
        assert client.get(f"/v1/generations/{job_id}").status_code == 200
    assert commands == ["INCRBY", "EXPIRE", "EVALSHA"]
