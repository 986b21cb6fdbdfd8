"""`/docs`: Swagger UI served from this server (the `swagger-ui-bundle` package), no CDN.

The page keeping the API key in localStorage shares this origin, so no third-party script
may run here; the CSP (`default-src 'self'`) would block one anyway. The init script is
`app/static/swagger-init.js`, since inline scripts are blocked too.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from ..errors import not_found

ASSETS_PREFIX = "/swagger-ui"

router = APIRouter(tags=["web"])

PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>promptpix API</title>
<link rel="stylesheet" href="{ASSETS_PREFIX}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{ASSETS_PREFIX}/swagger-ui-bundle.js"></script>
<script src="/static/swagger-init.js"></script>
</body>
</html>
"""


def swagger_assets() -> Path | None:
    """The folder of Swagger UI's files from `swagger-ui-bundle`, None when not installed."""
    try:
        from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]
    except ImportError:
        return None
    path = Path(swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").is_file() else None


@router.get("/docs", include_in_schema=False)
def docs() -> HTMLResponse:
    """Swagger UI for `/openapi.json`."""
    if swagger_assets() is None:
        raise not_found("API docs (install the `swagger-ui-bundle` package)")
    return HTMLResponse(PAGE)
