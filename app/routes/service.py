"""Operational endpoints: `/healthz`, `/readyz`, `/metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from ..deps import SettingsDep, StoreDep, authenticated
from ..errors import ErrorResponse, error_response
from ..metrics import render_metrics
from ..schemas import Readiness

router = APIRouter(tags=["service"])

NOT_READY_RETRY_AFTER_S = 5


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """200 while the process lives (no Redis call)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": ErrorResponse, "description": "not ready, with the reason"}})
def readyz(request: Request, store: StoreDep) -> Readiness | JSONResponse:
    """200 when Redis answers and a worker with a loaded model has a live heartbeat.
    `?scope=api`: 200 whenever Redis answers (for load balancers and probes of the API
    itself, which must not depend on workers)."""
    headers = {"Retry-After": str(NOT_READY_RETRY_AFTER_S)}
    store.r.ping()  # a Redis error becomes 503 `unavailable` in the error handlers
    if request.query_params.get("scope") == "api":
        return Readiness(status="ready", workers=sum(1 for w in store.live_workers()
                                                     if w.get("model_id")),
                         queue_depth=store.queue_depth())
    workers = [w for w in store.live_workers() if w.get("model_id")]
    if not workers:
        return error_response(503, "unavailable",
                              "no worker with a loaded model has a live heartbeat", headers=headers)
    return Readiness(status="ready", workers=len(workers), queue_depth=store.queue_depth())


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}})
async def metrics(request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    """Prometheus text; needs an API key when keys are on and PROMPTPIX_METRICS_PUBLIC=false."""
    if not settings.metrics_public:
        await authenticated(request, settings)
    return Response(await run_in_threadpool(render_metrics, store),
                    media_type=CONTENT_TYPE_LATEST)
