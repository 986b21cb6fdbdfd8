"""`GET /v1/generations` (issue 17 phase B): the caller's jobs only, newest first, a status
filter and cursor pagination over the per-owner index the admission script writes."""

from __future__ import annotations

import base64
from collections.abc import Callable

import redis
from fastapi.testclient import TestClient

from worker.protocol import Keys

from .conftest import VALID

KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def _pages(c: TestClient, headers: dict[str, str], **query: object) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        params = {**query, **({"cursor": cursor} if cursor else {})}
        r = c.get("/v1/generations", params=params, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list"
        pages.append([j["id"] for j in body["data"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


def test_list_own_jobs_newest_first_filtered_and_paged(
        make_client: Callable[..., TestClient], redis_url: str) -> None:
    c = make_client(api_keys=f"{KEY_A},{KEY_B}", rate_limit=0, max_queued_per_key=0)
    mine = [c.post("/v1/generations", json={**VALID, "seed": k}, headers=A).json()["id"]
            for k in range(7)]
    theirs = c.post("/v1/generations", json=VALID, headers=B).json()["id"]
    for job_id in mine[1:4]:
        assert c.delete(f"/v1/generations/{job_id}", headers=A).status_code == 200
    newest_first = mine[::-1]
    pages = _pages(c, A, limit=3)
    assert [j for p in pages for j in p] == newest_first and max(map(len, pages)) == 3
    assert _pages(c, B) == [[theirs]]
    canceled = [j for p in _pages(c, A, status="canceled", limit=2) for j in p]
    assert canceled == mine[1:4][::-1]
    queued = [j for p in _pages(c, A, status="queued") for j in p]
    assert queued == [mine[6], mine[5], mine[4], mine[0]]
    # An expired job leaves the listing (and the index) when it is next read.
    redis.Redis.from_url(redis_url).delete(Keys.job(mine[6]))
    assert [j for p in _pages(c, A) for j in p] == newest_first[1:]
    assert redis.Redis.from_url(redis_url).zscore(
        Keys.owner_jobs(c.app.state.store.get(mine[0]).owner), mine[6]) is None
    for bad in ("!!", base64.urlsafe_b64encode(b"nan:" + b"0" * 32).decode()):
        r = c.get("/v1/generations", params={"cursor": bad}, headers=A)
        assert r.status_code == 422 and r.json()["error"]["field"] == "cursor", r.text
    r = c.get("/v1/generations", params={"status": "lost"}, headers=A)
    assert r.status_code == 422
