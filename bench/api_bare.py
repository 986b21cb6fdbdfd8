"""The ceiling `bench/api.py` measures promptpix against: a bare FastAPI + `redis.asyncio`
app doing the same Redis work as promptpix's hot path, and nothing else.

    BARE_REDIS_URL=redis://... uvicorn bench.api_bare:create_app --factory

GET /v1/generations/{id}: read one job hash (HGETALL; promptpix's own, so both apps read
the same bytes) and answer it as JSON.
POST /v1/generations: validate a prompt, then write a job hash and its RQ entry (RQ's job
hash, the queue push, the queues set) in one MULTI transaction.
No auth, limits, metrics, middleware or error shapes: what is left is FastAPI, uvicorn
and one Redis round trip, the least any such service can cost.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel

QUEUE = "rq:queue:bare"


class Submission(BaseModel):
    prompt: str
    num_images: int = 1
    seed: int | None = None


def create_app() -> FastAPI:
    """The bare app over the Redis at $BARE_REDIS_URL."""
    r = aioredis.Redis.from_url(os.environ["BARE_REDIS_URL"])

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await r.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/v1/generations/{job_id}")
    async def get_job(job_id: str) -> Response:
        raw = await r.hgetall(f"promptpix:job:{job_id}")
        if not raw:
            raise HTTPException(404)
        return Response(json.dumps({k.decode(): v.decode() for k, v in raw.items()}),
                        media_type="application/json")

    @app.post("/v1/generations", status_code=202)
    async def post_job(body: Submission) -> dict[str, str]:
        job_id = uuid.uuid4().hex
        now = repr(time.time())
        async with r.pipeline(transaction=True) as pipe:
            pipe.hset(f"bare:job:{job_id}", mapping={
                "id": job_id, "status": "queued", "prompt": body.prompt,
                "seed": str(body.seed), "created_at": now})
            pipe.hset(f"rq:job:{job_id}", mapping={
                "status": "queued", "origin": "bare", "enqueued_at": now,
                "data": body.model_dump_json(), "created_at": now})
            pipe.rpush(QUEUE, job_id)
            pipe.sadd("rq:queues", QUEUE)
            await pipe.execute()
        return {"id": job_id, "status": "queued", "status_url": f"/v1/generations/{job_id}"}

    return app
