"""Live job events (server-sent events) over real HTTP, read with an SSE client (httpx-sse)."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse
from PIL import Image

from tests.e2e.api_stack import Stack
from tests.worker.helpers import finished, poll_job


@pytest.fixture
def stack(api_stack: Stack) -> Stack:
    return api_stack


def read(client: httpx.Client, url: str, headers: dict[str, str] | None = None,
         stop_after: int | None = None) -> list[ServerSentEvent]:
    """Events of one connection, until the server ends it or `stop_after` events."""
    out: list[ServerSentEvent] = []
    with connect_sse(client, "GET", url, headers=dict(headers or {})) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for event in source.iter_sse():
            out.append(event)
            if stop_after is not None and len(out) >= stop_after:
                break  # leaving the block closes the connection
    return out


def key(event: ServerSentEvent) -> tuple[int, int]:
    ms, seq = event.id.split("-")
    return int(ms), int(seq)


def data(event: ServerSentEvent) -> dict[str, Any]:
    return dict(json.loads(event.data))


def test_job_events_resume_with_last_event_id(stack: Stack) -> None:
    job_id = stack.slow_job(0.1)  # 16 rows, ~1.6 s
    url = f"/v1/generations/{job_id}/events"
    first = read(stack.http, url, stop_after=4)
    assert [e.event for e in first[:2]] == ["status", "status"]
    assert [data(e)["status"] for e in first[:2]] == ["queued", "running"]
    progress = [data(e) for e in first if e.event == "progress"]
    assert progress and all(p["job"] == job_id and p["rows_total"] == 16 for p in progress)
    assert 0 < progress[0]["rows_done"] < 16
    # Reconnect where we left off: only later events, in id order, ending with `done`.
    rest = read(stack.http, url, headers={"Last-Event-ID": first[-1].id})
    assert all(key(e) > key(first[-1]) for e in rest)
    keys = [key(e) for e in first + rest]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert [e.event for e in rest[-2:]] == ["status", "done"]
    done = data(rest[-1])
    assert done["id"] == job_id and done["status"] == "succeeded" and len(done["images"]) == 1
    rows = [data(e)["rows_done"] for e in first + rest if e.event == "progress"]
    assert rows == sorted(rows) and len(rows) >= 3
    # A finished job's stream: everything at once, then the end; nothing after `done`.
    assert [e.event for e in read(stack.http, url)] == ["status", "status", "status", "done"]
    assert read(stack.http, url, headers={"Last-Event-ID": rest[-1].id}) == []


def test_several_jobs_on_one_connection(stack: Stack) -> None:
    slow = stack.slow_job(0.05)
    fast = stack.http.post("/v1/generations", json={"prompt": "a blue square"}).json()["id"]
    events = read(stack.http, f"/v1/events?ids={slow},{fast}")
    done = {data(e)["id"]: data(e) for e in events if e.event == "done"}
    assert set(done) == {slow, fast} and all(d["status"] == "succeeded" for d in done.values())
    for job_id in (slow, fast):
        mine = [e for e in events if (data(e).get("job") or data(e).get("id")) == job_id]
        assert mine[0].event == "status" and mine[-1].event == "done"
        assert [key(e) for e in mine] == sorted(key(e) for e in mine)
    assert poll_job(stack.http, slow, finished)["status"] == "succeeded"


def test_event_stream_errors(stack: Stack) -> None:
    job_id = stack.http.post("/v1/generations", json={"prompt": "a red square"}).json()["id"]
    assert stack.http.get(f"/v1/generations/{'0' * 32}/events").status_code == 404
    assert stack.http.get(f"/v1/events?ids={job_id},{'0' * 32}").status_code == 404
    many = ",".join(f"{i:032x}" for i in range(51))
    assert stack.http.get(f"/v1/events?ids={many}").status_code == 422
    assert stack.http.get("/v1/events?ids=,").status_code == 422
    assert httpx.get(f"{stack.base}/v1/events?ids={job_id}").status_code == 401
    assert httpx.get(f"{stack.base}/v1/generations/{job_id}/events").status_code == 401


def test_a_score_job_on_the_event_stream_ends_with_its_score_view(stack: Stack) -> None:
    """Score jobs share the stream: their `done` event is the GET /v1/scores/{id} view."""
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (220, 40, 40)).save(png, format="PNG")
    captions = ["a red square", "a blue square"]
    job_id = stack.http.post("/v1/scores", json={
        "image": base64.b64encode(png.getvalue()).decode(), "captions": captions}).json()["id"]
    events = read(stack.http, f"/v1/events?ids={job_id}")
    assert events[0].event == "status" and events[-1].event == "done"
    done = data(events[-1])
    assert done == stack.http.get(f"/v1/scores/{job_id}").json()
    assert done["status"] == "succeeded" and [r["caption"] for r in done["results"]] == captions
