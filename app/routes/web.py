"""The web page: `GET /` serves `app/static/index.html` (static files are mounted in main)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..errors import not_found

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["web"])


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The single-page client."""
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise not_found("page")
    return FileResponse(page, media_type="text/html")
