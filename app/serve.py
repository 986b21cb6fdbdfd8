"""`promptpix serve`: run the HTTP API with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promptpix serve", description="run the promptpix HTTP API")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn processes (default 1)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", action="store_true", help="do not log each request")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse flags, check settings, run uvicorn until stopped; return the exit status."""
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print("promptpix serve: --workers must be >= 1", file=sys.stderr)
        return 2
    from pydantic import ValidationError

    from worker.protocol import Settings, describe_settings_error

    try:
        settings = Settings()
    except ValidationError as e:
        print(f"promptpix serve: invalid settings:\n{describe_settings_error(e)}",
              file=sys.stderr)
        return 2
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Must be set before any uvicorn process imports prometheus_client.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="promptpix-prom-")
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("serving on http://%s:%d with %d process(es), Redis %s", args.host, args.port,
                args.workers, settings.redis_url_safe)
    # X-Forwarded-For is believed only from PROMPTPIX_FORWARDED_ALLOW_IPS (rate limits and
    # failed-auth counts key on the client address); "" trusts no proxy.
    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=args.log_level,
                access_log=not args.no_access_log, timeout_graceful_shutdown=10,
                proxy_headers=True, forwarded_allow_ips=settings.forwarded_allow_ips)
    return 0


if __name__ == "__main__":
    sys.exit(main())
