"""Build the FastAPI app: settings, store, middleware, error handlers, routers.

`uvicorn app.main:create_app --factory` (what `promptpix serve` runs). Importing this
module builds nothing and never imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from worker.protocol import JobStore, Settings, get_settings, redis_connection, start_reaper

from .deps import Limiters
from .errors import install_error_handlers
from .jobwatch import async_redis, close_async_redis
from .middleware import EdgeMiddleware
from .routes import (
    docs,
    events,
    generations,
    listing,
    models,
    openai_images,
    scores,
    service,
    web,
)
from .store_async import AsyncStore

logger = logging.getLogger(__name__)

DESCRIPTION = """Text-to-image jobs: POST a prompt, poll the job, fetch PNGs.
Every error is `{"error": {"code", "message", "field"?}}`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app bound to `settings` (default: from the environment)."""
    settings = settings or get_settings()
    store = JobStore(redis_connection(settings), settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One asyncio client (one pool) for the app's life: the hot path's reads,
        # admissions and counters, and the routes that watch jobs.
        aredis = async_redis(app)
        app.state.astore = AsyncStore(aredis, store)
        app.state.limiters = Limiters.over(aredis)
        reaper = start_reaper(store)
        logger.info("API up: Redis %s, keys %s", settings.redis_url_safe,
                    "on" if settings.api_key_list else "off")
        try:
            yield
        finally:
            reaper.stop()
            store.r.close()
            await close_async_redis(app)

    app = FastAPI(title="promptpix", version="0.1.0", description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.store = store
    install_error_handlers(app)
    app.include_router(generations.router)
    app.include_router(listing.router)
    app.include_router(scores.router)
    app.include_router(models.router)
    app.include_router(openai_images.router)
    app.include_router(events.router)
    app.include_router(service.router)
    app.include_router(web.router)
    app.include_router(docs.router)
    if web.STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    if (assets := docs.swagger_assets()) is not None:
        app.mount(docs.ASSETS_PREFIX, StaticFiles(directory=assets), name="swagger-ui")
    # Outermost: it sees the request before anything reads it, and every answer leaves
    # through it (refusals too).
    app.add_middleware(EdgeMiddleware, allowed_hosts=settings.allowed_hosts,
                       upload_limit=settings.max_upload_bytes, upload_paths=scores.UPLOAD_PATHS)
    return app
