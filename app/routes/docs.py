"""`/docs`: Swagger UI served from this server, no CDN.

Its files come from the `fastapi-offline` package (Swagger UI 5; the `swagger-ui-bundle`
package ships Swagger UI 4, which cannot read FastAPI's OpenAPI 3.1 schema).

The page keeping the API key in localStorage shares this origin, so no third-party script
may run here; the CSP (`default-src 'self'`) would block one anyway. The init script is
`app/static/swagger-init.js`, since inline scripts are blocked too.
"""

from __future__ import annotations

import importlib.util
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
    """The folder of Swagger UI's files (from `fastapi-offline`), None when not installed."""
    spec = importlib.util.find_spec("fastapi_offline")  # its files only: nothing imported
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "static"
    return path if (path / "swagger-ui-bundle.js").is_file() else None


@router.get("/docs", include_in_schema=False)
def docs() -> HTMLResponse:
    """Swagger UI for `/openapi.json`."""
    if swagger_assets() is None:
        raise not_found("API docs (install the `fastapi-offline` package)")
    return HTMLResponse(PAGE)
