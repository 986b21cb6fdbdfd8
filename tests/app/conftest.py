"""API fixtures: the real app (ASGI, lifespan run) over the session's real Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from worker.protocol import Settings

VALID = {"prompt": "a large red circle in the top left on a white background", "seed": 7}


@pytest.fixture
def make_client(redis_url: str) -> Iterator[Callable[..., TestClient]]:
    """Build a TestClient for an app with `Settings(redis_url=..., **overrides)`; the model
    `tiny` is declared (PROMPTPIX_MODELS) unless overridden, so jobs are accepted without a
    worker."""
    with ExitStack() as stack:
        def make(**overrides: Any) -> TestClient:
            settings = Settings(redis_url=redis_url, **{"models": "tiny", **overrides})
            return stack.enter_context(TestClient(create_app(settings)))

        yield make


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    """The app with default settings (keys off)."""
    return make_client()
