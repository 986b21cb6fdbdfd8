"""Container health checks (stdlib only, so the slim API image needs nothing more).

    python healthcheck.py api [PORT]      # 0 when GET /readyz is 200 (Redis, a worker with a model)
    python healthcheck.py worker [PORT]   # 0 when the worker's metrics say its model is loaded

PORT defaults to the image's: 8000 for the API, $PROMPTPIX_WORKER_METRICS_PORT (9100) for
a worker.

Exit status 0 = healthy, 1 = not (Docker's convention); the reason goes to stdout, which
`docker inspect --format '{{json .State.Health}}'` shows.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0
API_PORT = 8000


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:  # 4xx/5xx still carry a body worth showing
        return e.code, e.read().decode("utf-8", "replace")


def check_api(port: int | None = None) -> tuple[bool, str]:
    """Readiness of the API on `port` (default: the port the image's CMD serves)."""
    status, body = _get(f"http://127.0.0.1:{port or API_PORT}/readyz")
    return status == 200, f"/readyz {status}: {body[:300]}"


def check_worker(port: int | None = None) -> tuple[bool, str]:
    """The worker is ready when its `promptpix_model_loaded` gauge reads 1."""
    port = port or int(os.environ.get("PROMPTPIX_WORKER_METRICS_PORT") or 9100)
    status, body = _get(f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        return False, f"/metrics {status}"
    for line in body.splitlines():
        if line.startswith("promptpix_model_loaded") and float(line.rsplit(" ", 1)[1]) == 1.0:
            return True, line
    return False, "no model loaded yet (promptpix_model_loaded is not 1)"


def main(argv: list[str]) -> int:
    checks = {"api": check_api, "worker": check_worker}
    if not 1 <= len(argv) <= 2 or argv[0] not in checks or not all(a.isdigit() for a in argv[1:]):
        print(f"usage: healthcheck.py {{{'|'.join(checks)}}} [PORT]")
        return 2
    try:
        ok, reason = checks[argv[0]](int(argv[1]) if len(argv) == 2 else None)
    except (OSError, ValueError) as e:  # refused, timed out, unparsable gauge
        ok, reason = False, f"{type(e).__name__}: {e}"
    print(("healthy: " if ok else "unhealthy: ") + reason)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
