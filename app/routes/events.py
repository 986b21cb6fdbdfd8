"""Live job events as server-sent events: one job, or several on one connection.

Events (`event:` names): `status` (`{"job", "status", "attempt"}`), `progress`
(`{"job", "progress", "rows_done", "rows_total"}`) and, last, `done` (the job view, as
`GET /v1/generations/{id}` answers it, or `GET /v1/scores/{id}` for a score job). For now
they are derived by watching the job hash with the asyncio Redis client; event ids have
the shape of Redis stream ids (`<unix ms>-<seq>`), so moving to a Redis stream of
transitions keeps the wire format.
Per job, ids increase: `queued` = created ms, `running` = start ms, progress = start ms
with the rows done as sequence, the final `status`/`done` = finish ms (`-0`, `-1`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse

from worker.protocol import JobKind, JobRecord, JobStatus, JobStore

from ..deps import JOB_ID_PATTERN, JobIdPath, PrincipalDep, StoreDep
from ..errors import ERROR_RESPONSES, ApiError, not_found
from ..jobwatch import (
    FINISHED,
    WATCH_INTERVAL_S,
    json_of,
    owned_job,
    owned_jobs,
    request_redis,
    rows_done,
    rows_total,
)
from .generations import job_view
from .scores import score_view

MAX_JOBS_PER_STREAM = 50
PING_S = 15
EventKey = tuple[int, int]
_EVENT_ID = re.compile(r"^([0-9]{1,15})-([0-9]{1,9})$")
_SSE = {200: {"content": {"text/event-stream": {}},
              "description": "server-sent events: `status`, `progress`, `done`"}}

router = APIRouter(tags=["events"], responses={**ERROR_RESPONSES, **_SSE})


def _ms(ts: float | None) -> int:
    return int(ts * 1000) if ts else 0


def parse_event_id(value: str | None) -> EventKey:
    """A Last-Event-ID as (ms, seq); anything else means "from the start"."""
    m = _EVENT_ID.match((value or "").strip())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def job_events(job: JobRecord, store: JobStore) -> list[tuple[EventKey, str, dict[str, Any]]]:
    """The events the job's current state implies, in id order (see the module doc)."""
    job_id, state, attempt = job.id, job.status, job.attempt
    created, started = _ms(job.created_at), _ms(job.started_at)
    out: list[tuple[EventKey, str, dict[str, Any]]] = [
        ((created, 0), "status", {"job": job_id, "status": "queued", "attempt": attempt})]
    if started:
        out.append(((started, 0), "status", {"job": job_id, "status": "running",
                                             "attempt": attempt}))
        done, total = rows_done(job), rows_total(job)
        if done and state is JobStatus.RUNNING:
            out.append(((started, done), "progress", {
                "job": job_id, "progress": job.progress,
                "rows_done": done, "rows_total": total}))
    if state in FINISHED:
        end = max(_ms(job.finished_at), started + 1, created + 1)
        out.append(((end, 0), "status", {"job": job_id, "status": state.value,
                                         "attempt": attempt}))
        final = score_view(job, store) if job.kind is JobKind.SCORE else job_view(job, store)
        view = json.loads(final.model_dump_json())
        out.append(((end, 1), "done", view))
    return out


def _sse(key: EventKey, kind: str, data: dict[str, Any]) -> dict[str, str]:
    return {"id": f"{key[0]}-{key[1]}", "event": kind, "data": json_of(data)}


def _gone(job_id: str) -> dict[str, str]:
    return {"event": "error", "data": json_of({"job": job_id, "error": {
        "code": "not_found", "message": f"job {job_id} expired or was deleted"}})}


@router.get("/v1/generations/{job_id}/events", response_class=EventSourceResponse)
async def job_event_stream(
    job_id: JobIdPath, request: Request, principal: PrincipalDep, store: StoreDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventSourceResponse:
    """`text/event-stream` of one job until it ends. Reconnect with `Last-Event-ID` to get
    only what came after that event. Read it with `fetch` (EventSource cannot send the key)."""
    r = request_redis(request)
    if not re.match(JOB_ID_PATTERN, job_id) or await owned_job(r, job_id, principal.owner) is None:
        raise not_found()

    async def events() -> AsyncIterator[dict[str, str]]:
        last = parse_event_id(last_event_id)
        while True:
            job = await owned_job(r, job_id, principal.owner)
            if job is None:
                yield _gone(job_id)
                return
            for key, kind, data in job_events(job, store):
                if key > last:
                    yield _sse(key, kind, data)
                    last = key
            if job.status in FINISHED:
                return
            await asyncio.sleep(WATCH_INTERVAL_S)

    return EventSourceResponse(events(), ping=PING_S)


@router.get("/v1/events", response_class=EventSourceResponse)
async def multi_event_stream(
    request: Request, principal: PrincipalDep, store: StoreDep,
    ids: Annotated[str, Query(description=f"comma-separated job ids (1..{MAX_JOBS_PER_STREAM})")],
) -> EventSourceResponse:
    """Events of several jobs on one connection (each event's data names its `job`); ends
    when every job has ended. A reconnect sends each job's latest state again (events keep
    their ids, so a client can drop what it has seen)."""
    wanted = list(dict.fromkeys(x.strip() for x in ids.split(",") if x.strip()))
    if not 1 <= len(wanted) <= MAX_JOBS_PER_STREAM:
        raise ApiError(422, "invalid_request",
                       f"ids must name 1..{MAX_JOBS_PER_STREAM} jobs, got {len(wanted)}", "ids")
    r = request_redis(request)
    bad = [j for j in wanted if not re.match(JOB_ID_PATTERN, j)]
    if not bad:
        found = await owned_jobs(r, wanted, principal.owner)
        bad = [j for j, job in zip(wanted, found, strict=True) if job is None]
    if bad:
        raise ApiError(404, "not_found", f"job {bad[0][:40]!r} not found", "ids")

    async def events() -> AsyncIterator[dict[str, str]]:
        last = dict.fromkeys(wanted, (0, 0))
        while last:
            pending = list(last)
            for job_id, job in zip(pending, await owned_jobs(r, pending, principal.owner),
                                   strict=True):
                if job is None:
                    yield _gone(job_id)
                    del last[job_id]
                    continue
                for key, kind, data in job_events(job, store):
                    if key > last[job_id]:
                        yield _sse(key, kind, data)
                        last[job_id] = key
                if job.status in FINISHED:
                    del last[job_id]
            if last:
                await asyncio.sleep(WATCH_INTERVAL_S)

    return EventSourceResponse(events(), ping=PING_S)
